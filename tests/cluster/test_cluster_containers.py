"""medseg's own containers on a real node: the chart installed, a model trained, served and scaled.

The cluster of ``scripts/cluster.py`` has, beside the kwok fake node, a real node: a kubelet with
containerd + runc, pods on the fixture's bridge, kube-proxy, CoreDNS and metrics-server (see its
docstring). The images are the ones ``make images`` builds (``scripts/images.py``), imported into
containerd. While this module runs the fake node is cordoned, so every pod lands on the real node
and runs its real container; what is checked below is what a user meets after ``helm install``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from medseg.platform.kube import Release
from tests.cluster.cluster_kit import CL, ROOT, SCRIPT, eventually, helm, kubectl, kubectl_json
from tests.cluster.test_cluster import CHART, drop_namespace, make_namespace

TINY_TRAIN: dict[str, dict[str, Any]] = {
    "model": {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]},
    "train": {"batch_size": 2, "num_workers": 0, "roi_size": [32, 32, 32], "epochs": 4},
    "infer": {"roi_size": [32, 32, 32]},
    "split": {"val_fraction": 0.34},
}
#: Requests small enough for every pod of these tests on one 2-core node at once.
SMALL = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "2Gi"}}


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@dataclass(frozen=True)
class Node:
    """The real node's cluster, ready for the platform.

    Attributes:
        values: The bundle's chart values (``make bundle``'s ``values-bundle.yaml``): every image
            of the chart pointed at the archives built and imported here.
        project: The project image's reference (training pods).
    """

    values: Path
    project: str


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """The cluster with its real node and the platform's images; the fake node cordoned.

    The images are built first (``make images``; cached: seconds when warm) so that ``up``
    imports them; a cluster already running gets them imported here. A cluster this fixture
    started stops after this module.
    """
    images = CL.image_definitions()
    built = images.build()
    values = tmp_path_factory.mktemp("bundle") / "values-bundle.yaml"
    values.write_text(yaml.safe_dump(images.bundle_values(built)))
    reuse = CL.healthy(node=True)
    if not reuse:
        done = subprocess.run([sys.executable, str(SCRIPT), "up"], timeout=3 * 3600)
        assert done.returncode == 0, f"the cluster did not come up; logs in {CL.LOGS}"
        CL.load_ports()
    CL.import_images([b.archive for b in built])
    CL.use_real_node()
    yield Node(values, images.images()["medseg"].ref)
    CL.use_fake_node()
    if not reuse:
        subprocess.run([sys.executable, str(SCRIPT), "down"], timeout=300, check=False)


# --- what the runtime says about a container ---------------------------------------------------


def container_process(status: dict[str, Any]) -> dict[str, str]:
    """``/proc/PID/status`` of a running container's first process, read on the host.

    Args:
        status: The pod's ``containerStatuses`` entry.
    """
    container_id = status["containerID"].removeprefix("containerd://")
    tasks = {line.split()[0]: line.split()[1] for line in CL._ctr("task", "ls").splitlines()[1:]}
    pid = tasks[container_id]
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    root = next(
        line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        if line.split()[4] == "/"
    )  # fmt: skip
    return {**{k: v.strip() for k, v in fields.items()}, "root_options": root[5]}


def assert_restricted(pod: dict[str, Any]) -> None:
    """Every running container of ``pod`` is non-root, read-only, without capabilities."""
    name = pod["metadata"]["name"]
    for status in pod["status"].get("containerStatuses", []):
        if "running" not in status.get("state", {}):
            continue
        proc = container_process(status)
        where = f"{name}/{status['name']}"
        assert all(uid != "0" for uid in proc["Uid"].split()), (where, proc["Uid"])
        assert all(gid != "0" for gid in proc["Gid"].split()), (where, proc["Gid"])
        assert int(proc["CapEff"], 16) == 0 and int(proc["CapPrm"], 16) == 0, where
        assert proc["NoNewPrivs"] == "1", where
        assert proc["Seccomp"] == "2", where  # filter mode: the runtime's default profile
        assert "ro" in proc["root_options"].split(","), (where, proc["root_options"])


# --- the chart installed on the real node ------------------------------------------------------


class Platform:
    """The chart, installed with the bundle's values as release ``prod``, and how to reach it.

    Attributes:
        release: The release's names.
        kubeconfig: The chart's pipeline ServiceAccount's credentials.
        env: This process's environment pointed at the release's MinIO (its Service address,
            through kube-proxy) with the credentials the chart generated.
    """

    def __init__(self, node: Node, tmp: Path) -> None:
        self.node = node
        self.release = Release("prod", "real-medseg")
        self.kubeconfig = tmp / "pipeline-sa.kubeconfig"
        self.tmp = tmp
        self.env: dict[str, str] = {}

    def install(self) -> None:
        ns = self.release.namespace
        make_namespace(ns)
        # A volume left Released by an interrupted run would never bind again.
        kubectl("delete", "pv", "-l", f"medseg-test/namespace={ns}", "--wait=true")
        volume = CL.RUN / "volumes" / ns
        shutil.rmtree(volume, ignore_errors=True)  # an interrupted run's objects: start empty
        volume.mkdir(parents=True)
        os.chown(volume, 1000, 1000)  # MinIO runs as uid 1000; a hostPath keeps its owner
        from tests.cluster.test_cluster import minio_volume

        minio_volume(self.release)
        small = json.dumps(SMALL)
        done = helm(
            "install", self.release.name, str(CHART), "-n", ns, "-f", str(self.node.values),
            "--set", "inferenceService.enabled=false",
            "--set-json", f"minio.resources={small}",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        eventually(
            lambda: _job_complete(ns, f"{self.release.fullname}-bucket-1"),
            timeout=300, what="the chart's MinIO Ready and its bucket made",
        )  # fmt: skip
        token = kubectl("create", "token", self.release.pipeline_service_account, "-n", ns,
                        "--duration=2h")  # fmt: skip
        assert token.returncode == 0, token.stderr
        admin = yaml.safe_load(CL.KUBECONFIG.read_text())
        admin["users"][0]["user"] = {"token": token.stdout.strip()}
        self.kubeconfig.write_text(yaml.safe_dump(admin))
        secret = kubectl_json("get", "secret", self.release.s3_secret, "-n", ns)["data"]
        service = kubectl_json("get", "service", f"{self.release.fullname}-minio", "-n", ns)
        import base64

        self.env = {
            **os.environ,
            "S3_ENDPOINT": f"http://{service['spec']['clusterIP']}:9000",
            "S3_USE_HTTPS": "0",
            "AWS_ACCESS_KEY_ID": base64.b64decode(secret["AWS_ACCESS_KEY_ID"]).decode(),
            "AWS_SECRET_ACCESS_KEY": base64.b64decode(secret["AWS_SECRET_ACCESS_KEY"]).decode(),
            "MEDSEG_ENV_FILE": str(self.tmp / "no-such.env"),
            "MEDSEG_CACHE_DIR": str(self.tmp / "cache"),
            "MEDSEG_STORE": "s3://medseg",
        }

    def medseg(self, *args: str, kube: bool = False, timeout: float = 900) -> str:
        """``medseg ARGS`` on this machine against the release's MinIO (as the pipeline SA)."""
        env = {**self.env, **({"KUBECONFIG": str(self.kubeconfig)} if kube else {})}
        return _run([sys.executable, "-m", "medseg", *args], env=env, timeout=timeout)


def _job_complete(namespace: str, name: str) -> bool:
    job = kubectl("get", "job", name, "-n", namespace, "-o", "json")
    if job.returncode != 0:
        return False
    return any(
        c["type"] == "Complete" and c["status"] == "True"
        for c in json.loads(job.stdout).get("status", {}).get("conditions", [])
    )


@pytest.fixture(scope="module")
def platform(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    plat = Platform(node, tmp_path_factory.mktemp("platform"))
    plat.install()
    yield plat
    helm("uninstall", plat.release.name, "-n", plat.release.namespace, "--wait",
         "--timeout", "120s")  # fmt: skip
    drop_namespace(plat.release.namespace)


def running_pods(namespace: str, selector: str = "") -> list[dict[str, Any]]:
    args = ["get", "pods", "-n", namespace] + (["-l", selector] if selector else [])
    return [p for p in kubectl_json(*args)["items"] if p["status"].get("phase") == "Running"]


def test_the_chart_runs_its_real_containers_restricted(platform: Platform) -> None:
    ns = platform.release.namespace
    pods = kubectl_json("get", "pods", "-n", ns)["items"]
    assert pods
    for pod in pods:
        assert pod["spec"]["nodeName"] == CL.REAL_NODE_NAME, pod["metadata"]["name"]
    minio = running_pods(ns, "app.kubernetes.io/component=minio")
    assert len(minio) == 1
    (status,) = minio[0]["status"]["containerStatuses"]
    assert status["ready"] is True  # by its own readiness probe, through the real kubelet
    assert_restricted(minio[0])
    # The bucket Job's container ran (and exited 0) in the same image family.
    job = kubectl_json("get", "pods", "-n", ns, "-l", "app.kubernetes.io/component=bucket")
    assert any(p["status"]["phase"] == "Succeeded" for p in job["items"])


# --- data-parallel preprocessing fanned out over pods ------------------------------------------

#: Where the shard measurement leaves its figures (``docs/scaling.md`` quotes them).
SHARDS_RESULT = ROOT / ".medseg" / "results" / "shards-real-node.json"
#: Full BraTS size, and enough cases for each of two shards to do several.
FULL_SHAPE, FULL_CASES = (240, 240, 155), 8


def shard_job(platform: Platform, name: str, step: list[str], shards: int) -> dict[str, Any]:
    """An Indexed Job of ``shards`` pods; pod ``I`` runs ``medseg STEP… --shards K --shard I``.

    Each pod is the pipeline's shard step as a ``ParallelFor`` iteration runs it on a cluster:
    the project image, the chart's S3 Secret and ConfigMap, the pipeline ServiceAccount, the
    hardened container, one worker process in a 1-CPU pod. (No Kubeflow Pipelines backend runs
    here, so the Job controller makes the pods instead of KFP's driver.)
    """
    from kubernetes.client import (
        ApiClient,
        V1Job,
        V1JobSpec,
        V1ObjectMeta,
        V1PodSpec,
        V1PodTemplateSpec,
    )

    from medseg.core.settings import PlacementSettings
    from medseg.platform.kube import (
        PART_OF,
        platform_container,
        platform_pod,
        resources,
        scratch_env,
    )
    from medseg.platform.launchers import S3Secret

    release = platform.release
    argv = " ".join(map(shlex.quote, ["medseg", *step, "--store", "s3://medseg"]))
    script = f'exec {argv} --shards {shards} --shard "$JOB_COMPLETION_INDEX"'
    container = platform_container(
        name="shard",
        image=platform.node.project,
        command=["/bin/sh", "-c", script],
        env=[*S3Secret(release.s3_secret, release.s3_config).env(), scratch_env()],
        resources=resources("500m", "2Gi", cpu_limit="1", memory_limit="4Gi"),
    )
    job = V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=V1ObjectMeta(name=name, namespace=release.namespace, labels=dict(PART_OF)),
        spec=V1JobSpec(
            completion_mode="Indexed",
            completions=shards,
            parallelism=shards,
            backoff_limit=0,
            template=V1PodTemplateSpec(
                metadata=V1ObjectMeta(labels=dict(PART_OF)),
                spec=V1PodSpec(
                    containers=[container],
                    restart_policy="Never",
                    service_account_name=release.pipeline_service_account,
                    **platform_pod(PlacementSettings().steps),
                ),
            ),
        ),
    )
    serialized: dict[str, Any] = ApiClient().sanitize_for_serialization(job)
    return serialized


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _run_shards(platform: Platform, step: list[str], shards: int) -> dict[str, Any]:
    """Run the shard Job of ``medseg STEP…`` to completion; its wall time and each pod's work.

    Each pod computed exactly its share of the cases (sorted round-robin by case id).
    """
    ns, name = platform.release.namespace, f"{step[0]}-{shards}-shards"
    kubectl("delete", "job", name, "-n", ns, "--wait=true")
    t0 = time.monotonic()
    made = kubectl("apply", "-f", "-", stdin=json.dumps(shard_job(platform, name, step, shards)))
    assert made.returncode == 0, made.stderr

    def finished() -> bool:
        conditions = kubectl_json("get", "job", name, "-n", ns)["status"].get("conditions", [])
        failed = [c for c in conditions if c["type"] == "Failed" and c["status"] == "True"]
        assert not failed, (failed, kubectl("logs", "-n", ns, f"job/{name}").stdout[-3000:])
        return any(c["type"] == "Complete" and c["status"] == "True" for c in conditions)

    eventually(finished, timeout=900, what=f"the {shards}-shard {step[0]} Job complete")
    wall = time.monotonic() - t0
    pods = kubectl_json("get", "pods", "-n", ns, "-l", f"job-name={name}")["items"]
    done = []
    for pod in pods:
        (status,) = pod["status"]["containerStatuses"]
        ended = status["state"]["terminated"]
        index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        log = kubectl("logs", "-n", ns, pod["metadata"]["name"]).stdout
        done.append({
            "shard": int(index), "node": pod["spec"]["nodeName"], "exit": ended["exitCode"],
            "seconds": _seconds(ended["finishedAt"]) - _seconds(ended["startedAt"]),
            "log": [line for line in log.splitlines() if line.startswith(("shard ", "when "))],
        })  # fmt: skip
    kubectl("delete", "job", name, "-n", ns, "--wait=false")
    done.sort(key=lambda p: p["shard"])
    assert [p["shard"] for p in done] == list(range(shards)), done
    for pod in done:
        assert pod["node"] == CL.REAL_NODE_NAME and pod["exit"] == 0, pod
        mine = len(range(pod["shard"], FULL_CASES, shards))
        said = f"shard {pod['shard']} of {shards}: {mine} cases, {mine} computed"
        assert said in " ".join(pod["log"]), pod
    run = {"shards": shards, "wall_s": round(wall, 1), "pods": done}
    return run


@pytest.fixture(scope="module")
def full_size(platform: Platform) -> str:
    """``brats-full@VERSION``: FULL_CASES generated full-size cases, ingested into the release."""
    from medseg.core.settings import StorageSettings
    from medseg.core.storage import Storage
    from medseg.data.manifest import DatasetRef

    raw = platform.tmp / "raw-full"
    platform.medseg("synth", str(raw), "--layout", "brats2021", "--cases", str(FULL_CASES),
                    "--shape", *map(str, FULL_SHAPE))  # fmt: skip
    platform.medseg("ingest", str(raw), "--dataset", "brats-full")
    storage = Storage(StorageSettings.model_validate(platform.env))
    return f"brats-full@{DatasetRef.resolve(storage, 's3://medseg', 'brats-full').version}"


def _record(step: str, runs: list[dict[str, Any]]) -> float:
    """Write the step's runs to ``SHARDS_RESULT`` (beside the other steps'); the speed-up."""
    speedup = runs[0]["wall_s"] / runs[1]["wall_s"]
    recorded = json.loads(SHARDS_RESULT.read_text()) if SHARDS_RESULT.is_file() else {}
    recorded[step] = {"cases": FULL_CASES, "shape": FULL_SHAPE, "runs": runs,
                      "speedup_2_vs_1": round(speedup, 2)}  # fmt: skip
    SHARDS_RESULT.parent.mkdir(parents=True, exist_ok=True)
    SHARDS_RESULT.write_text(json.dumps(recorded, indent=1))
    print(
        f"\n{step}: 1 shard {runs[0]['wall_s']} s, 2 shards {runs[1]['wall_s']} s, {speedup:.2f}x"
    )
    return speedup


def test_preprocess_fans_out_over_shard_pods_and_collects_the_same_index(
    platform: Platform, full_size: str
) -> None:
    """Full-size cases preprocessed by 1 pod, then by 2 shard pods: the same index, and the time
    each took (written to ``SHARDS_RESULT``; a figure, not a bound)."""
    from medseg.config import DataConfig
    from medseg.core.settings import StorageSettings
    from medseg.core.storage import Storage
    from medseg.data.manifest import DatasetRef
    from medseg.data.preprocess import INDEX, preprocessed_prefix

    storage = Storage(StorageSettings.model_validate(platform.env))
    prefix = preprocessed_prefix(
        DatasetRef.resolve(storage, "s3://medseg", full_size), DataConfig()
    )
    runs, indexes = [], []
    for shards in (1, 2):
        storage.delete_prefix(prefix)  # each run computes every case
        step = ["preprocess", "--dataset", full_size, "--workers", "1"]
        runs.append(_run_shards(platform, step, shards))
        platform.medseg("preprocess", "--dataset", full_size, "--shards", str(shards), "--collect")
        indexes.append(storage.get_json(f"{prefix}/{INDEX}"))
    one, two = indexes
    assert two["cases"] == one["cases"]  # the same entries, case by case (hashes included)
    assert len(one["cases"]) == FULL_CASES
    _record("preprocess", runs)


# --- training ----------------------------------------------------------------------------------


def _master_log(namespace: str, job: str) -> str:
    done = kubectl("logs", "-n", namespace, f"{job}-master-0", "-c", "pytorch")
    return done.stdout + done.stderr


def _epochs_done(platform: Platform, run_id: str) -> int:
    from medseg.core.settings import StorageSettings
    from medseg.core.storage import Storage, join

    storage = Storage(StorageSettings.model_validate(platform.env))
    uri = join("s3://medseg", "runs", run_id, "metrics.jsonl")
    if not storage.exists(uri):
        return 0
    return len(storage.get_bytes(uri).decode().splitlines())


RUN_ID = "real"
JOB = f"medseg-{RUN_ID}"  # the name the PyTorchJob launcher gives the run's job


@pytest.fixture(scope="module")
def trained(platform: Platform) -> dict[str, Any]:
    """Synthetic cases ingested and preprocessed here; the pipeline's train step, run as its pod
    would run it (as the chart's pipeline ServiceAccount), trains them in a real PyTorchJob.

    Mid-run the worker pod is deleted: the operator recreates it and the run resumes.
    """
    from kfp.dsl import Dataset, Metrics, Model

    from components import train_op
    from medseg.config import MedsegConfig
    from medseg.core.settings import StorageSettings
    from medseg.core.storage import Storage
    from medseg.data.manifest import DatasetRef
    from medseg.data.preprocess import preprocessed_prefix
    from medseg.platform.pipeline_params import DatasetArtifact, PreprocessedArtifact, write_ref

    tmp, ns = platform.tmp, platform.release.namespace
    raw = tmp / "raw"
    platform.medseg("synth", str(raw), "--layout", "brats2021", "--cases", "6",
                    "--shape", "40", "40", "32")  # fmt: skip
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_TRAIN))
    platform.medseg("ingest", str(raw), "--dataset", "brats", "--config", str(config))
    platform.medseg("preprocess", "--dataset", "brats@latest", "--config", str(config))
    storage = Storage(StorageSettings.model_validate(platform.env))
    ref = DatasetRef.resolve(storage, "s3://medseg", "brats@latest")
    cfg = MedsegConfig.model_validate(TINY_TRAIN)
    arts = {n: kind(name=n, uri=str(tmp / n)) for n, kind in
            (("dataset", Dataset), ("prep", Dataset), ("model", Model))}  # fmt: skip
    for art in arts.values():
        art.path = art.uri  # a local file, as the KFP launcher maps it
    dataset = f"brats@{ref.version}"
    write_ref(arts["dataset"], DatasetArtifact(uri=ref.prefix, digest=ref.version,
                                               store="s3://medseg", dataset=dataset))  # fmt: skip
    prepped = PreprocessedArtifact(
        uri=preprocessed_prefix(ref, cfg.data), dataset=dataset, digest=cfg.data.fingerprint()
    )
    write_ref(arts["prep"], prepped)
    failure: list[BaseException] = []

    def step() -> None:
        try:
            train_op.python_func(
                dataset=arts["dataset"], preprocessed=arts["prep"], config_yaml=cfg.to_yaml(),
                run_id=RUN_ID, training={"launcher": "pytorchjob", "workers": 2,
                "image": platform.node.project, "cpu": "500m", "memory": "3Gi",
                "timeout": 1500}, cluster={"namespace": ns, "release": platform.release.name},
                model=arts["model"], metrics=Metrics(name="metrics", uri=str(tmp / "metrics")),
            )  # fmt: skip
        except BaseException as exc:  # reported by the test, not lost in the thread
            failure.append(exc)

    with pytest.MonkeyPatch.context() as mp:
        for key, value in platform.env.items():
            mp.setenv(key, value)
        # The chart's pipeline account: $KUBECONFIG as the kubernetes client reads it.
        mp.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION",
                   str(platform.kubeconfig))  # fmt: skip
        thread = threading.Thread(target=step, daemon=True)
        thread.start()
        eventually(lambda: _epochs_done(platform, RUN_ID) >= 1 or not thread.is_alive(),
                   timeout=900, what="the first epoch of the PyTorchJob")  # fmt: skip
        assert not failure, failure
        done_before = _epochs_done(platform, RUN_ID)
        worker = kubectl_json("get", "pod", f"{JOB}-worker-0", "-n", ns)
        gone = kubectl("delete", "pod", f"{JOB}-worker-0", "-n", ns, "--wait=false")
        assert gone.returncode == 0, gone.stderr
        eventually(lambda: _recreated(ns, worker["metadata"]["uid"]), timeout=120,
                   what="the operator recreating the deleted worker")  # fmt: skip
        thread.join(1600)
    assert not failure, failure
    return {"done_before": done_before, "storage": storage, "model": arts["model"]}


def _recreated(namespace: str, uid: str) -> bool:
    pods = kubectl_json("get", "pods", "-n", namespace, "-l",
                        f"training.kubeflow.org/job-name={JOB},"
                        "training.kubeflow.org/replica-type=worker")["items"]  # fmt: skip
    return bool(pods) and all(p["metadata"]["uid"] != uid for p in pods)


def test_pytorchjob_trains_over_the_pod_network_and_survives_a_deleted_worker(
    platform: Platform, trained: dict[str, Any]
) -> None:
    ns, run_id = platform.release.namespace, RUN_ID
    log = _master_log(ns, JOB)  # from the real kubelet, through the API server
    epochs = int(TINY_TRAIN["train"]["epochs"])
    assert _epochs_done(platform, run_id) >= epochs
    # The train step read the run's result back, as the pipeline's next steps do.
    from medseg.platform.pipeline_params import ModelArtifact, read_ref

    assert read_ref(trained["model"], ModelArtifact).run_id == run_id
    # Both pods ran on the real node and resolved each other over the pod network (gloo).
    pods = kubectl_json("get", "pods", "-n", ns, "-l", f"training.kubeflow.org/job-name={JOB}")
    for pod in pods["items"]:
        assert pod["spec"]["nodeName"] == CL.REAL_NODE_NAME
    resumed = [int(m) for m in re.findall(rf"resuming {run_id} after epoch (\d+)", log)]
    assert resumed, log[-3000:]
    # At most the epoch in flight was lost.
    assert max(resumed) >= trained["done_before"], (resumed, trained["done_before"])
    from medseg.core.storage import join

    storage = trained["storage"]
    assert storage.exists(join("s3://medseg", "runs", run_id, "model", "model.pt"))


def test_batch_predict_fans_out_over_shard_pods_and_collects_the_same_predictions(
    platform: Platform, trained: dict[str, Any], full_size: str
) -> None:
    """The trained run segments the full-size cases as 1 pod, then as 2 shard pods: the same
    label maps (by hash) and volumes, and the time each took (``SHARDS_RESULT``)."""
    storage, runs, tables = trained["storage"], [], []
    for shards in (1, 2):
        out = f"s3://medseg/predictions/full-{shards}"
        step = ["predict", "--model", RUN_ID, "--dataset", full_size, "--split", "all"]
        runs.append(_run_shards(platform, [*step, "--out", out], shards))
        platform.medseg(*step, "--out", out, "--shards", str(shards), "--collect")
        tables.append(storage.get_json(f"{out}/predictions.json"))
    one, two = tables
    assert len(one["cases"]) == FULL_CASES and not one["failed"], one["failed"]
    assert two["cases"] == one["cases"]  # keys, label-map sha256, shapes, volumes
    _record("predict", runs)


# --- serving -----------------------------------------------------------------------------------

MODEL_NAME = "brats-real"
ISVC = "brats"


def _case(platform: Platform) -> Path:
    return sorted(p for p in (platform.tmp / "raw").iterdir() if p.is_dir())[-1]


def _predictor_pods(namespace: str) -> list[dict[str, Any]]:
    return [
        p for p in running_pods(namespace, f"serving.kserve.io/inferenceservice={ISVC}")
        if all(s["ready"] for s in p["status"].get("containerStatuses", []))
    ]  # fmt: skip


@pytest.fixture(scope="module")
def deployed(platform: Platform, trained: dict[str, Any]) -> str:
    """The trained run registered, and the pipeline's deploy step run as its pod would run it
    (as the chart's pipeline ServiceAccount): Standard mode, replicas sized for this node."""
    ns = platform.release.namespace
    platform.medseg("register", "--run-id", RUN_ID, "--name", MODEL_NAME)
    model_uri = f"s3://medseg/models/{MODEL_NAME}/v1"
    deployment = {
        "target": "kserve", "mode": "Standard", "min_replicas": 1, "max_replicas": 2,
        "scale_metric": "cpu", "scale_target": 50, "timeout": 900, "cpu": "200m",
        "memory": "2Gi", "cpu_limit": "1",
    }  # fmt: skip
    cluster = {"namespace": ns, "release": platform.release.name}
    call = (
        "import sys\n"
        "from kfp.dsl import Model\n"
        "from components import deploy_op\n"
        "from medseg.platform.pipeline_params import ModelArtifact, write_ref\n"
        f"m = Model(name='model', uri={str(platform.tmp / 'deployed-model')!r}); m.path = m.uri\n"
        f"write_ref(m, ModelArtifact(uri={model_uri!r}, digest='0' * 64, run_id={RUN_ID!r}, "
        "dataset='brats'))\n"
        f"print(deploy_op.python_func(model=m, name={ISVC!r}, deployment={deployment!r}, "
        f"cluster={cluster!r}))\n"
    )
    env = {**platform.env, "KUBECONFIG": str(platform.kubeconfig)}
    url = _run([sys.executable, "-c", call], env=env, timeout=1000).strip().splitlines()[-1]
    assert url.startswith("http"), url
    return model_uri


def test_the_predictor_fetches_the_model_and_serves_what_the_library_serves(
    platform: Platform, deployed: str, tmp_path: Path
) -> None:
    from medseg.core.settings import DEFAULT_SERVED_NAME, StorageSettings
    from medseg.core.storage import Storage
    from medseg.serving.client import predict
    from tests.conftest import model_server

    ns = platform.release.namespace
    (pod,) = _predictor_pods(ns)
    assert pod["spec"]["nodeName"] == CL.REAL_NODE_NAME
    # KServe's storage initializer ran to completion: it fetched the model from the chart's MinIO.
    (init,) = pod["status"]["initContainerStatuses"]
    assert init["name"] == "storage-initializer"
    assert init["state"]["terminated"]["exitCode"] == 0
    fetched = kubectl("logs", "-n", ns, pod["metadata"]["name"], "-c", "storage-initializer")
    assert fetched.returncode == 0, fetched.stderr
    assert_restricted(pod)
    # Its 1-CPU limit, not the node's cores, sets torch's threads (medseg.core.cpus).
    count = "import medseg, torch; print(torch.get_num_threads())"
    threads = kubectl("exec", "-n", ns, pod["metadata"]["name"], "-c", "kserve-container", "--",
                      "python", "-c", count)  # fmt: skip
    assert threads.returncode == 0, threads.stderr
    assert threads.stdout.split() == ["1"], threads.stdout
    ip = pod["status"]["podIP"]
    case = _case(platform)
    rest = predict(f"http://{ip}:8080", [case], model=ISVC, labels=True)
    grpc = predict(f"{ip}:8081", [case], grpc=True, model=ISVC, labels=True)
    # The same model, served in-process here by the library's entrypoint.
    storage = Storage(StorageSettings.model_validate(platform.env))
    local = tmp_path / "model"
    local.mkdir()
    for obj in storage.list(deployed):
        (local / obj.uri.rsplit("/", 1)[-1]).write_bytes(storage.get_bytes(obj.uri))
    assert (local / "model.pt").is_file(), sorted(p.name for p in local.iterdir())
    with model_server(local, tmp_path / "server.log") as here:
        mine = predict(here.url, [case], model=DEFAULT_SERVED_NAME, labels=True)
    assert rest.labels is not None and grpc.labels is not None and mine.labels is not None
    np.testing.assert_array_equal(rest.labels, mine.labels)
    np.testing.assert_array_equal(grpc.labels, mine.labels)
    assert rest.volumes_ml == mine.volumes_ml
    # From the InferenceService's name back to its model version, run and dataset (the cluster
    # read as an admin would: the pipeline's account may not list InferenceServices).
    env = {**platform.env, "KUBECONFIG": str(CL.KUBECONFIG)}
    chain = json.loads(_run([sys.executable, "-m", "medseg", "lineage", ISVC, "--namespace", ns,
                             "--json"], env=env))  # fmt: skip
    assert chain["deployments"] == {f"{ns}/{ISVC}": f"{MODEL_NAME}@v1"}, chain
    assert list(chain["runs"]) == [RUN_ID] and list(chain["models"]) == [f"{MODEL_NAME}@v1"]


# --- autoscaling -------------------------------------------------------------------------------

#: Where the scaling test leaves its timeline (``scripts/plot_autoscale.py`` draws it).
TIMELINE = ROOT / ".medseg" / "results" / "autoscale-timeline.json"


def _pod_cpu_millis(namespace: str) -> dict[str, int]:
    done = kubectl("get", "--raw", f"/apis/metrics.k8s.io/v1beta1/namespaces/{namespace}/pods")
    if done.returncode != 0:
        return {}
    usage: dict[str, int] = {}
    for item in json.loads(done.stdout)["items"]:
        if not item["metadata"]["name"].startswith(f"{ISVC}-predictor"):
            continue
        total = 0.0
        for c in item["containers"]:
            cpu = c["usage"]["cpu"]
            total += float(cpu[:-1]) / 1e6 if cpu.endswith("n") else float(cpu.rstrip("m"))
        usage[item["metadata"]["name"]] = round(total)
    return usage


def test_the_hpa_kserve_made_scales_the_predictor_out_and_back(
    platform: Platform, deployed: str
) -> None:
    from medseg.serving.client import predict

    ns = platform.release.namespace
    service = kubectl_json("get", "service", f"{ISVC}-predictor", "-n", ns)
    url = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
    case = _case(platform)
    latencies: list[tuple[float, float]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def load() -> None:  # bounded: two clients, until stopped, each waiting for its answer
        while not stop.is_set():
            started = time.monotonic()
            predict(url, [case], model=ISVC)
            latencies.append((started - t0, time.monotonic() - started))

    timeline: list[dict[str, Any]] = []

    def sample(phase: str) -> dict[str, Any]:
        hpa = kubectl_json("get", "hpa", f"{ISVC}-predictor", "-n", ns)
        recent = [lat for at, lat in latencies if at > time.monotonic() - t0 - 10]
        point = {
            "t": round(time.monotonic() - t0, 1),
            "phase": phase,
            "replicas": hpa["status"].get("currentReplicas", 0),
            "desired": hpa["status"].get("desiredReplicas", 0),
            "ready": len(_predictor_pods(ns)),
            "cpu_m": _pod_cpu_millis(ns),
            "latency_s": round(sum(recent) / len(recent), 2) if recent else None,
        }
        timeline.append(point)
        return point

    # From one idle replica (the serving test's requests may have scaled it already).
    eventually(lambda: sample("before")["replicas"] == 1 and timeline[-1]["ready"] == 1,
               timeout=300, what=f"one idle replica before the load: {timeline[-3:]}")  # fmt: skip
    timeline.clear()
    t0 = time.monotonic()
    clients = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for c in clients:
        c.start()
    try:
        eventually(lambda: sample("load")["ready"] >= 2, timeout=600,
                   what=f"a second ready replica under load: {timeline[-3:]}")  # fmt: skip
        # Both replicas answer, each addressed directly.
        for pod in _predictor_pods(ns):
            got = predict(f"http://{pod['status']['podIP']}:8080", [case], model=ISVC)
            assert got.mask, pod["metadata"]["name"]
    finally:
        stop.set()
        for c in clients:
            c.join(600)
    eventually(lambda: sample("idle")["replicas"] == 1, timeout=600,
               what=f"back to one replica without load: {timeline[-3:]}")  # fmt: skip
    TIMELINE.parent.mkdir(parents=True, exist_ok=True)
    TIMELINE.write_text(json.dumps({"latencies": latencies, "samples": timeline}, indent=1))
    assert max(p["replicas"] for p in timeline) == 2
