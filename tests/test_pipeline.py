"""The Kubeflow pipeline: compiled structure, cluster objects, and a local run on kfp.local."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from medseg.deploy import InferenceServiceSpec, build_inference_service
from medseg.errors import MedsegError
from medseg.kube import SERVER_IMAGE
from medseg.launchers import PyTorchJobSpec, S3Secret, build_pytorchjob, submit_pytorchjob
from medseg.pipeline_runner import compile_pipeline
from medseg.storage import Storage, join
from pipelines.medseg_pipeline import medseg_pipeline
from tests.k8s import kserve_api_client

from .conftest import tiny_config

STEPS = ["ingest", "preprocess", "train", "predict", "evaluate", "gate", "register", "deploy"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    path = compile_pipeline(medseg_pipeline, tmp_path_factory.mktemp("ir") / "pipeline.yaml")
    return list(yaml.safe_load_all(path.read_text()))


def test_compiled_pipeline_structure(compiled: list[dict[str, Any]]) -> None:
    spec, platform = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(tasks) == sorted(f"{s}-op" for s in STEPS)
    deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    # each step waits for the one before it
    for before, after in itertools.pairwise(STEPS):
        assert f"{before}-op" in deps[f"{after}-op"], (before, after, deps[f"{after}-op"])
    assert deps["ingest-op"] == set()
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in (
        "source",
        "epochs",
        "workers",
        "gpus_per_worker",
        "launcher",
        "dice_threshold",
        "min_replicas",
        "max_replicas",
        "deploy_target",
        "s3_secret",
    ):
        assert name in params
    assert params["launcher"]["defaultValue"] == "local"
    assert params["dice_threshold"]["defaultValue"] == 0.8
    cached = {n for n, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    # Not ingest: its source path names no content (new files under it are a new version).
    assert cached == {"preprocess-op", "predict-op", "evaluate-op"}
    # evaluate scores the predict step's label maps, handed over as a typed artifact
    inputs = tasks["evaluate-op"]["inputs"]["artifacts"]["predictions"]["taskOutputArtifact"]
    assert inputs == {"outputArtifactKey": "predictions", "producerTask": "predict-op"}
    # the predictor runs the model server image, the PyTorchJob the project image
    deploy_image = tasks["deploy-op"]["inputs"]["parameters"]["image"]
    assert deploy_image == {"componentInputParameter": "server_image"}
    assert params["server_image"]["defaultValue"] == SERVER_IMAGE
    train_image = tasks["train-op"]["inputs"]["parameters"]["image"]
    assert train_image == {"componentInputParameter": "image"}
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in STEPS:
        container = executors[f"exec-{step}-op"]["container"]
        assert container["image"] == "ghcr.io/medseg/medseg:0.1.0"
        assert "pip install" not in " ".join(container["command"])  # nothing installed at run
        res = container["resources"]
        assert res["resourceCpuRequest"] and res["resourceMemoryLimit"]
        secret = k8s[f"exec-{step}-op"]["secretAsEnv"][0]
        assert secret["secretNameParameter"] == {"componentInputParameter": "s3_secret"}
        assert {e["envVar"] for e in secret["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        }
        config = k8s[f"exec-{step}-op"]["configMapAsEnv"][0]
        assert {e["envVar"] for e in config["keyToEnv"]} == {"S3_ENDPOINT", "S3_USE_HTTPS"}
    # no credential value anywhere in the compiled pipeline
    text = yaml.safe_dump(compiled)
    assert "secretKey" in text and "minioadmin" not in text


def _roundtrip(obj: Any, api_client: Any, klass: str) -> Any:
    data = api_client.sanitize_for_serialization(obj)
    response = SimpleNamespace(data=json.dumps(data))
    return data, api_client.deserialize(response, klass)


def test_pytorchjob_roundtrips_through_the_training_sdk() -> None:
    from kubeflow.training import ApiClient

    spec = PyTorchJobSpec(
        name="medseg-run-1",
        image="registry.example/medseg:1.2.3",
        dataset="brats@abc",
        store="s3://medseg",
        run_id="run-1",
        config_uri="s3://medseg/runs/run-1/config.yaml",
        workers=3,
        gpus_per_worker=4,
        s3=S3Secret(name="my-s3", config="my-s3-config"),
    )
    job = build_pytorchjob(spec)
    data, back = _roundtrip(job, ApiClient(), "KubeflowOrgV1PyTorchJob")
    assert back == job
    replicas = data["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert data["spec"]["nprocPerNode"] == "4"
    assert data["spec"]["runPolicy"]["backoffLimit"] == 3
    for replica in replicas.values():
        assert replica["restartPolicy"] == "OnFailure"
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch" and container["image"] == spec.image
        script = container["command"][-1]
        for var in (
            "PET_NNODES",
            "PET_NPROC_PER_NODE",
            "PET_NODE_RANK",
            "PET_MASTER_ADDR",
            "PET_MASTER_PORT",
        ):
            assert f'"${var}"' in script
        assert "-m medseg.train --dataset brats@abc --run-id run-1" in script
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "my-s3",
            "key": "AWS_SECRET_ACCESS_KEY",
        }
        assert "value" not in env["AWS_ACCESS_KEY_ID"]
        assert env["S3_ENDPOINT"]["valueFrom"]["configMapKeyRef"] == {
            "name": "my-s3-config",
            "key": "S3_ENDPOINT",
        }
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert pod["securityContext"]["runAsNonRoot"] is True
        _validate_pod(pod)


def _validate_pod(pod_spec: dict[str, Any]) -> None:
    """The pod template is a valid Pod for strict Kubernetes schemas."""
    import kubernetes_validate

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod_spec}
    for version in ("1.30", "1.33"):
        kubernetes_validate.validate(pod, version, strict=True)


def test_bad_launcher_parameters_fail_early() -> None:
    common = {"name": "j", "image": "i", "dataset": "d@v", "store": "s3://b", "run_id": "r"}
    with pytest.raises(MedsegError, match="at least 1 worker"):
        PyTorchJobSpec(**common, config_uri="s3://b/c.yaml", workers=0)


def test_ingest_component_checks_the_launch_parameters_before_any_work(tmp_path: Path) -> None:
    from kfp.dsl import Dataset

    from components import ingest_op

    out = Dataset(name="dataset", uri=str(tmp_path / "dataset"))
    out.path = str(tmp_path / "dataset")
    with pytest.raises(MedsegError, match="workers must be at least 1, got 0"):
        ingest_op.python_func(
            source=str(tmp_path / "absent"),  # never read: the parameters fail first
            name="d",
            store=str(tmp_path / "store"),
            labels="",
            config_yaml="",
            launcher="local",
            workers=0,
            gpus_per_worker=0,
            dataset=out,
        )
    assert not (tmp_path / "store").exists() and not (tmp_path / "dataset").exists()


def test_gate_component_stops_the_run_below_the_threshold() -> None:
    from components import gate_op

    assert gate_op.python_func(passed=True, dice_mean=0.91, threshold=0.9) == 0.91
    with pytest.raises(RuntimeError, match=r"quality gate failed: .* 0\.8500 < 0\.9"):
        gate_op.python_func(passed=False, dice_mean=0.85, threshold=0.9)


class _FakeTrainingClient:
    """Stands in for the cluster: the job is created, then reported Failed by the operator."""

    def __init__(self) -> None:
        self.created: list[Any] = []

    def create_job(self, job: Any, namespace: str) -> None:
        self.created.append(job)

    def wait_for_job_conditions(self, name: str, **kwargs: Any) -> Any:
        self.wait_kwargs = kwargs
        raise RuntimeError(f"PyTorchJob {name} is Failed")

    def get_job(self, name: str, namespace: str) -> Any:
        cond = SimpleNamespace(
            type="Failed", status="True", reason="PyTorchJobFailed", message="pod OOMKilled"
        )
        return SimpleNamespace(status=SimpleNamespace(conditions=[cond]))


def test_failed_pytorchjob_reports_the_operator_reason() -> None:
    spec = PyTorchJobSpec(
        name="j", image="i", dataset="d@v", store="s3://b", run_id="r", config_uri="s3://b/c"
    )
    client = _FakeTrainingClient()
    with pytest.raises(MedsegError, match="PyTorchJobFailed: pod OOMKilled"):
        submit_pytorchjob(
            spec, wait_timeout=7200, client=client, stream_logs=False, check_version=False
        )
    assert client.created and client.wait_kwargs["wait_timeout"] == 7200


def test_inference_service_roundtrips_through_the_kserve_sdk() -> None:
    spec = InferenceServiceSpec(
        name="brats",
        storage_uri="s3://medseg/models/brats/v3",
        image="registry.example/medseg-server:1.2.3",
        deployment_mode="Standard",
        min_replicas=2,
        max_replicas=5,
        scale_metric="cpu",
        scale_target=70,
        gpus=1,
    )
    isvc = build_inference_service(spec)
    data, back = _roundtrip(isvc, kserve_api_client(), "V1beta1InferenceService")
    assert back == isvc
    predictor = data["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 5)
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("cpu", 70)
    assert predictor["serviceAccountName"] == "medseg-predictor"
    (container,) = predictor["containers"]
    assert container["image"] == spec.image
    assert {"name": "STORAGE_URI", "value": "s3://medseg/models/brats/v3"} in container["env"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["args"][container["args"].index("--model_dir") + 1] == "/mnt/models"
    assert data["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    with pytest.raises(MedsegError, match="min_replicas <= max_replicas"):
        InferenceServiceSpec(
            name="b", storage_uri="s3://m/x", image="i", min_replicas=4, max_replicas=2
        )
    with pytest.raises(MedsegError, match="does not apply to Knative"):
        InferenceServiceSpec(name="b", storage_uri="s3://m/x", image="i", scale_metric="cpu")


# The deploy step's wait and its failure report run against the real KServe controller:
# tests/test_cluster.py::test_deploy_surfaces_the_controller_conditions_and_recreates_on_mode_change


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medseg", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def pipeline_env(minio_server: Any, tmp_path: Path, bucket: str) -> dict[str, str]:
    return {
        **os.environ,
        **minio_server.env(),
        "MEDSEG_ENV_FILE": str(tmp_path / "none.env"),
        "MEDSEG_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.slow
def test_local_pipeline_run_end_to_end(
    synth_root: Path, pipeline_env: dict[str, str], bucket: str, storage: Storage, tmp_path: Path
) -> None:
    (tmp_path / "cfg.yaml").write_text(tiny_config(train={"epochs": 2, "batch_size": 1}).to_yaml())
    args = [
        "pipeline",
        "run",
        "--local",
        "--source",
        str(synth_root / "brats2021"),
        "--store",
        bucket,
        "--config",
        str(tmp_path / "cfg.yaml"),
        "--threshold",
        "0",
        "--workers",
        "2",
        "--model-name",
        "tiny",
        "--root",
        str(tmp_path / "root"),
    ]
    done = _cli(args, pipeline_env, tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    card = storage.get_json(join(bucket, "models", "tiny", "v1", "model_card.json"))
    assert card["dataset"]["name"] == "brats" and card["evaluation"]["gate"]["passed"] is True
    run_id = card["run_id"]
    history = storage.get_bytes(join(bucket, "runs", run_id, "metrics.jsonl")).splitlines()
    assert len(history) == 2 and json.loads(history[-1])["samples"] == 4  # 2 ranks x 2 cases
    report = storage.get_bytes(join(bucket, "runs", run_id, "eval", "report.html")).decode()
    assert "Per case (worst first)" in report
    # evaluation scored the predict step's label maps, and the card names that definition
    metrics = storage.get_json(join(bucket, "runs", run_id, "eval", "metrics.json"))
    predictions = storage.get_json(join(metrics["predictions"], "predictions.json"))
    assert metrics["predictions"].startswith(join(bucket, "runs", run_id, "predictions"))
    assert sorted(c["case_id"] for c in predictions["cases"]) == sorted(
        c["case_id"] for c in metrics["cases"]
    )
    assert card["evaluation"]["definition"] == metrics["definition"]
    # the KFP artifacts the UI shows: the HTML report and the metrics
    html = list((tmp_path / "root").rglob("evaluate-op/report"))
    assert html and html[0].read_text() == report
    assert "medseg serve --model" in done.stdout + done.stderr


def test_bad_pipeline_parameter_fails_in_the_first_step(
    synth_root: Path, pipeline_env: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    args = [
        "pipeline",
        "run",
        "--local",
        "--source",
        str(synth_root / "brats2021"),
        "--store",
        bucket,
        "--launcher",
        "slurm",
        "--root",
        str(tmp_path / "root"),
    ]
    done = _cli(args, pipeline_env, tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "launcher must be one of local, pytorchjob, got 'slurm'" in out
    assert "ingest-op" in out and "preprocess-op" not in out.split("launcher must be")[1]
    missing = _cli(
        [
            "pipeline",
            "run",
            "--local",
            "--source",
            str(tmp_path / "nope"),
            "--store",
            bucket,
            "--root",
            str(tmp_path / "root2"),
        ],
        pipeline_env,
        tmp_path,
    )
    assert missing.returncode != 0
    assert "is not a folder" in missing.stdout + missing.stderr
