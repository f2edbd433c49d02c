"""The chart, the launcher and the deploy step against a real Kubernetes control plane.

``scripts/cluster.py`` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler, the
real KServe and Training Operator controllers with their admission webhooks live, and kwok fake
nodes, all on 127.0.0.1 (one cluster for the session, reused when one is already running; a cold
machine builds the binaries first). Pods are scheduled and reconciled, but no container runs: kwok
moves them through their phases. Every namespace enforces Pod Security "restricted".
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from medseg.core.errors import MedsegError
from medseg.core.settings import Placement, ServerLimits
from medseg.platform.deploy import InferenceServiceSpec, deploy
from medseg.platform.kube import (
    MIN_OPERATORS,
    PIPELINE_RULES,
    SERVER_IMAGE,
    Release,
    check_operator,
    container_security_context,
)
from medseg.platform.launchers import PyTorchJobSpec, S3Secret, submit_pytorchjob
from tests.cluster.cluster_kit import CL, ROOT, SCRIPT, eventually, helm, kubectl, kubectl_json

CHART = ROOT / "charts" / "medseg"
VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
MODE = "serving.kserve.io/deploymentMode"
OVERLAYS = sorted(p.name for p in (ROOT / "manifests" / "overlays").iterdir())


@pytest.fixture(scope="module")
def cluster() -> Iterator[ModuleType]:
    """The control plane, once for the test run: reused when running, else started.

    A cold machine builds the binaries first. A cluster this fixture started stops after this
    module, so the rest of the suite does not share the two cores with an idle control plane.
    The real node comes up too (these tests keep off it: its taint), unless another checkout's
    node runs on this machine (one per machine) or this one is not root.
    """
    reuse = CL.healthy()
    if not reuse:
        alone = CL.node_holder() is not None or os.geteuid() != 0
        up = [sys.executable, str(SCRIPT), "up", *(["--no-node"] if alone else [])]
        done = subprocess.run(up, timeout=3 * 3600)
        assert done.returncode == 0, f"the cluster did not come up; logs in {CL.LOGS}"
        CL.load_ports()  # `up` may have moved to a free range of ports
    yield CL
    if not reuse:
        subprocess.run([sys.executable, str(SCRIPT), "down"], timeout=300, check=False)


def make_namespace(name: str) -> None:
    """A fresh namespace that enforces Pod Security "restricted" (the level medseg targets)."""
    kubectl("delete", "namespace", name, "--ignore-not-found", "--wait=true", "--timeout=120s")
    labels = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn")}
    doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
    done = kubectl("apply", "-f", "-", stdin=json.dumps(doc))
    assert done.returncode == 0, done.stderr


def drop_namespace(name: str) -> None:
    kubectl("delete", "namespace", name, "--ignore-not-found", "--wait=false")
    kubectl("delete", "pv", "-l", f"medseg-test/namespace={name}", "--wait=false")


def minio_volume(release: Release) -> None:
    """A PersistentVolume bound ahead to the chart's MinIO claim (there is no provisioner)."""
    claim = f"data-{release.fullname}-minio-0"
    doc = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": f"{release.namespace}-{claim}"[:63],
            "labels": {"medseg-test/namespace": release.namespace},
        },
        "spec": {
            "capacity": {"storage": "1Ti"},
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": CL.STORAGE_CLASS,
            "hostPath": {"path": str(CL.RUN / "volumes" / release.namespace)},
            "claimRef": {"namespace": release.namespace, "name": claim},
        },
    }
    done = kubectl("apply", "-f", "-", stdin=json.dumps(doc))
    assert done.returncode == 0, done.stderr


def pods_settled(namespace: str, selector: str = "") -> list[dict[str, Any]] | None:
    """The namespace's pods once each is Running or Succeeded (None while any is not)."""
    args = ["get", "pods", "-n", namespace] + (["-l", selector] if selector else [])
    pods = kubectl_json(*args)["items"]
    phases = [p["status"].get("phase") for p in pods]
    return pods if pods and all(ph in ("Running", "Succeeded") for ph in phases) else None


def namespaced_leftovers(namespace: str) -> list[str]:
    """Every object in the namespace, except what Kubernetes itself puts in each namespace."""
    kinds = kubectl("api-resources", "--verbs=list", "--namespaced", "-o", "name").stdout.split()
    skip = {"events", "events.events.k8s.io", "leases.coordination.k8s.io"}
    wanted = ",".join(k for k in kinds if k not in skip)
    out = kubectl("get", wanted, "-n", namespace, "-o", "name", "--ignore-not-found")
    assert out.returncode == 0, out.stderr
    builtin = {"serviceaccount/default", "configmap/kube-root-ca.crt"}
    return sorted(set(out.stdout.split()) - builtin)


# --- placement: a tainted GPU pool ------------------------------------------------------------

GPU_POOL = yaml.safe_load((CHART / "ci" / "gpu-pool-values.yaml").read_text())
#: The pool's placement, as ci/gpu-pool-values.yaml gives training and the predictor.
POOL = Placement.model_validate(
    {k: GPU_POOL["training"][k] for k in ("nodeSelector", "tolerations")}
    | {"imagePullSecrets": GPU_POOL["imagePullSecrets"]}
)
GPU_NODE = "kwok-gpu-0"


@pytest.fixture(scope="module")
def gpu_pool(cluster: ModuleType) -> Iterator[str]:
    """A kwok node of the GPU pool: labelled and tainted as ci/gpu-pool-values.yaml expects."""
    (toleration,) = POOL.tolerations
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": GPU_NODE,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": GPU_NODE, "kubernetes.io/os": "linux",
                       "type": "kwok", **POOL.node_selector},
        },
        "spec": {"taints": [{"key": toleration["key"], "value": "present",
                             "effect": toleration["effect"]}]},
    }  # fmt: skip
    done = kubectl("apply", "-f", "-", stdin=json.dumps(node))
    assert done.returncode == 0, done.stderr
    try:
        # Capacity, as scripts/cluster.py gives its own node (kwok keeps a node's own).
        status = {"status": {"capacity": CL.NODE_CAPACITY, "allocatable": CL.NODE_CAPACITY}}
        done = kubectl("patch", "node", GPU_NODE, "--subresource=status", "--type=merge",
                       "-p", json.dumps(status))  # fmt: skip
        assert done.returncode == 0, done.stderr
        eventually(
            lambda: any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in kubectl_json("get", "node", GPU_NODE)["status"].get("conditions", [])
            ),
            what=f"node {GPU_NODE} Ready (kwok)",
        )
        yield GPU_NODE
    finally:
        kubectl("delete", "node", GPU_NODE, "--wait=false")


def _scheduled(ns: str, name: str) -> dict[str, Any] | None:
    """The pod's PodScheduled condition once the scheduler has decided (None before)."""
    pod = kubectl_json("get", "pod", name, "-n", ns)
    conditions = pod["status"].get("conditions") or []
    return next((c for c in conditions if c["type"] == "PodScheduled"), None)


def test_scheduler_honours_node_selectors_and_taints(gpu_pool: str) -> None:
    """Pods placed by medseg.platform.kube.pod_placement, on the real scheduler: a node selector
    that no node satisfies, or a tainted pool without its toleration, leaves the pod Pending with
    the scheduler's reason; the pool's placement (selector and toleration) puts it on the pool."""
    from kubernetes.client import ApiClient, V1Container, V1ObjectMeta, V1Pod, V1PodSpec

    from medseg.platform.kube import pod_placement, pod_security_context, resources

    ns = "placement"
    make_namespace(ns)
    placements = {
        "nowhere": Placement(node_selector={"medseg.io/pool": "absent"}),
        "untolerated": Placement(node_selector=POOL.node_selector),
        "pool": POOL,
    }
    try:
        for name, placement in placements.items():
            pod = V1Pod(
                api_version="v1",
                kind="Pod",
                metadata=V1ObjectMeta(name=name, namespace=ns),
                spec=V1PodSpec(
                    containers=[V1Container(
                        name="c", image=SERVER_IMAGE, resources=resources("100m", "64Mi"),
                        security_context=container_security_context())],
                    security_context=pod_security_context(),
                    **pod_placement(placement),
                ),
            )  # fmt: skip
            doc = json.dumps(ApiClient().sanitize_for_serialization(pod))
            done = kubectl("apply", "-f", "-", stdin=doc)
            assert done.returncode == 0, done.stderr
        for name, reason in (("nowhere", "didn't match Pod's node affinity/selector"),
                             ("untolerated", "untolerated taint")):  # fmt: skip
            cond = eventually(lambda n=name: _scheduled(ns, n), what=f"{name} considered")
            assert (cond["status"], cond["reason"]) == ("False", "Unschedulable"), cond
            assert reason in cond["message"], cond["message"]
            pod = kubectl_json("get", "pod", name, "-n", ns)
            assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
            events = kubectl_json("get", "events", "-n", ns,
                                  "--field-selector", f"involvedObject.name={name}")  # fmt: skip
            assert any(e["reason"] == "FailedScheduling" for e in events["items"]), name
        eventually(
            lambda: (
                kubectl_json("get", "pod", "pool", "-n", ns)["status"].get("phase") == "Running"
            ),
            what="the pool's pod Running",
        )
        pod = kubectl_json("get", "pod", "pool", "-n", ns)
        assert pod["spec"]["nodeName"] == gpu_pool
        assert pod["spec"]["imagePullSecrets"] == [{"name": "medseg-registry"}]
    finally:
        drop_namespace(ns)


# --- the chart ----------------------------------------------------------------------------


def _values_objects(values: Path, release: Release) -> list[dict[str, Any]]:
    done = helm("template", release.name, str(CHART), "-n", release.namespace, "-f", str(values))
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _prepare(values: Path, release: Release) -> None:
    config = yaml.safe_load(values.read_text()) or {}
    existing = (config.get("s3") or {}).get("existingSecret")
    if existing:  # the user's own Secret, as docs/install.md says to create it
        done = kubectl(
            "create", "secret", "generic", existing, "-n", release.namespace,
            "--from-literal=AWS_ACCESS_KEY_ID=test", "--from-literal=AWS_SECRET_ACCESS_KEY=test",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    if (config.get("minio") or {}).get("enabled", True):
        minio_volume(release)


#: A pod spec's placement fields, as the chart renders them from a workload's block.
PLACEMENT_KEYS = ("nodeSelector", "tolerations", "affinity", "priorityClassName",
                  "topologySpreadConstraints", "imagePullSecrets")  # fmt: skip


def _placement_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {k: pod[k] for k in PLACEMENT_KEYS if k in pod}


def _template(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod spec an object renders: a workload's template, or the predictor's."""
    if obj["kind"] == "InferenceService":
        return dict(obj["spec"]["predictor"])
    return dict(obj["spec"]["template"]["spec"])


def _check_placement(objs: list[dict[str, Any]], ns: str, pods: list[dict[str, Any]]) -> None:
    """Object by object, the live pod specs carry the rendered placement, and every pod runs
    on a node its selector allows with its image's pull secrets."""
    owners = [o for o in objs if o["kind"] in ("StatefulSet", "Job", "InferenceService")]
    for obj in owners:
        live = kubectl_json("get", obj["kind"].lower(), obj["metadata"]["name"], "-n", ns)
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert _placement_of(_template(live)) == _placement_of(_template(obj)), where
    secrets = {s["name"] for o in owners for s in _template(o).get("imagePullSecrets", [])}
    for pod in pods:
        node = kubectl_json("get", "node", pod["spec"]["nodeName"])
        selector = pod["spec"].get("nodeSelector", {})
        assert selector.items() <= node["metadata"]["labels"].items(), pod["metadata"]["name"]
        if secrets:  # the global pull secret of ci/gpu-pool-values.yaml: on every pod
            assert {"name": "medseg-registry"} in pod["spec"]["imagePullSecrets"]


@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.stem)
def test_chart_installs_upgrades_and_uninstalls(
    cluster: ModuleType, values: Path, request: pytest.FixtureRequest
) -> None:
    if values.name == "gpu-pool-values.yaml":
        request.getfixturevalue("gpu_pool")  # the pool its predictor is placed on
    release = Release("rel", f"chart-{values.stem.removesuffix('-values')}")
    ns = release.namespace
    make_namespace(ns)
    try:
        _prepare(values, release)
        objs = _values_objects(values, release)
        # Every rendered object passes the API server's strict field validation and the webhooks.
        dry = kubectl(
            "apply", "--server-side", "--dry-run=server", "--validate=strict", "-n", ns,
            "-f", "-", stdin=yaml.safe_dump_all(objs),
        )  # fmt: skip
        assert dry.returncode == 0, dry.stderr
        # helm 4 applies server-side; the bucket Job is not a hook, so nothing blocks install.
        done = helm("install", release.name, str(CHART), "-n", ns, "-f", str(values))
        assert done.returncode == 0, done.stderr
        for obj in objs:
            got = kubectl("get", obj["kind"].lower(), obj["metadata"]["name"], "-n", ns)
            assert got.returncode == 0, f"{obj['kind']}/{obj['metadata']['name']}: {got.stderr}"
        # Pod Security "restricted" admits every pod the chart (and the operators) create, and
        # the scheduler places them (MinIO, the bucket Job, a Standard-mode predictor).
        isvc = next((o for o in objs if o["kind"] == "InferenceService"), None)
        standard = isvc and isvc["metadata"]["annotations"][MODE] == "Standard"
        workloads = [o for o in objs if o["kind"] in ("StatefulSet", "Job")]
        pods = []
        if workloads or standard:
            pods = eventually(lambda: pods_settled(ns), what=f"pods of {values.name} running")
        for pod in pods:
            for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
        _check_placement(objs, ns, pods)
        if values.name == "gpu-pool-values.yaml":  # the GPU predictor on the pool, nothing else
            for pod in pods:
                on_pool = pod["spec"]["nodeName"] == GPU_NODE
                predictor = "serving.kserve.io/inferenceservice" in pod["metadata"]["labels"]
                assert on_pool == predictor, (pod["metadata"]["name"], pod["spec"]["nodeName"])
            assert any("serving.kserve.io/inferenceservice" in p["metadata"]["labels"]
                       for p in pods)  # fmt: skip
        up = helm("upgrade", release.name, str(CHART), "-n", ns, "-f", str(values),
                  "--set", "inferenceService.maxReplicas=9")  # fmt: skip
        assert up.returncode == 0, up.stderr
        if isvc:
            live = kubectl_json("get", "inferenceservice", isvc["metadata"]["name"], "-n", ns)
            assert live["spec"]["predictor"]["maxReplicas"] == 9
        down = helm("uninstall", release.name, "-n", ns, "--wait", "--timeout", "120s")
        assert down.returncode == 0, down.stderr
        # Nothing is left but MinIO's data claim, which a StatefulSet keeps on purpose, and the
        # user's own credentials Secret (external S3).
        existing = (yaml.safe_load(values.read_text()) or {}).get("s3", {}).get("existingSecret")
        kept = {f"persistentvolumeclaim/data-{release.fullname}-minio-0"} & set(
            namespaced_leftovers(ns)
        ) | ({f"secret/{existing}"} if existing else set())
        eventually(
            lambda: set(namespaced_leftovers(ns)) <= kept,
            what=f"namespace {ns} empty after uninstall: {namespaced_leftovers(ns)}",
        )
    finally:
        drop_namespace(ns)


def test_deployment_mode_changes_only_by_delete_and_recreate(cluster: ModuleType) -> None:
    release = Release("modes", "chart-modes")
    ns = release.namespace
    standard = CHART / "ci" / "standard-values.yaml"
    make_namespace(ns)
    try:
        minio_volume(release)
        done = helm("install", release.name, str(CHART), "-n", ns, "-f", str(standard))
        assert done.returncode == 0, done.stderr
        to_knative = ["--set", "inferenceService.deploymentMode=Knative",
                      "--set", "inferenceService.scaleMetric=concurrency",
                      "--set", "inferenceService.scaleTarget=1"]  # fmt: skip
        refused = helm("upgrade", release.name, str(CHART), "-n", ns, "-f", str(standard),
                       *to_knative)  # fmt: skip
        assert refused.returncode != 0
        assert "cannot change in place (Standard -> Knative)" in refused.stderr, refused.stderr
        assert f"kubectl -n {ns} delete inferenceservice brats-segresnet" in refused.stderr
        # The documented path: delete the service, then upgrade.
        gone = kubectl("delete", "inferenceservice", "brats-segresnet", "-n", ns, "--wait=true")
        assert gone.returncode == 0, gone.stderr
        again = helm("upgrade", release.name, str(CHART), "-n", ns, "-f", str(standard),
                     *to_knative)  # fmt: skip
        assert again.returncode == 0, again.stderr
        live = kubectl_json("get", "inferenceservice", "brats-segresnet", "-n", ns)
        assert live["metadata"]["annotations"][MODE] == "Knative"
    finally:
        helm("uninstall", release.name, "-n", ns)
        drop_namespace(ns)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_overlay_applies_to_the_api_server(cluster: ModuleType, overlay: str) -> None:
    ns = f"kustomize-{overlay}"
    make_namespace(ns)
    try:
        secret = kubectl("create", "secret", "generic", "medseg-s3", "-n", ns,
                         "--from-literal=AWS_ACCESS_KEY_ID=x",
                         "--from-literal=AWS_SECRET_ACCESS_KEY=y")  # fmt: skip
        assert secret.returncode == 0, secret.stderr
        done = kubectl("apply", "-k", str(ROOT / "manifests" / "overlays" / overlay), "-n", ns,
                       "--server-side", "--dry-run=server", "--validate=strict")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "inferenceservice.serving.kserve.io/brats-segresnet serverside-applied" in (
            done.stdout
        )
    finally:
        drop_namespace(ns)


# --- the launcher, the deploy step and RBAC, as the chart's ServiceAccount ------------------


class Installed:
    """The chart installed as release ``prod`` (fullname ``prod-medseg``) in its own namespace."""

    def __init__(self, tmp: Path) -> None:
        self.release = Release("prod", f"e2e-{uuid.uuid4().hex[:6]}")
        self.sa = self.release.pipeline_service_account
        self.user = f"system:serviceaccount:{self.release.namespace}:{self.sa}"
        self.kubeconfig = tmp / "pipeline-sa.kubeconfig"

    def install(self) -> None:
        ns = self.release.namespace
        make_namespace(ns)
        minio_volume(self.release)
        done = helm("install", self.release.name, str(CHART), "-n", ns,
                    "--set", "inferenceService.enabled=false")  # fmt: skip
        assert done.returncode == 0, done.stderr
        token = kubectl("create", "token", self.sa, "-n", ns, "--duration=2h")
        assert token.returncode == 0, token.stderr
        admin = yaml.safe_load(CL.KUBECONFIG.read_text())
        admin["users"][0]["user"] = {"token": token.stdout.strip()}
        self.kubeconfig.write_text(yaml.safe_dump(admin))


@pytest.fixture(scope="module")
def installed(cluster: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    inst = Installed(tmp_path_factory.mktemp("sa"))
    inst.install()
    yield inst
    helm("uninstall", inst.release.name, "-n", inst.release.namespace)
    drop_namespace(inst.release.namespace)


def test_pytorchjob_is_reconciled_into_pods_that_succeed(
    installed: Installed, gpu_pool: str
) -> None:
    from kubeflow.training import TrainingClient

    release = installed.release
    ns = release.namespace
    spec = PyTorchJobSpec(
        name="train-e2e",
        image="ghcr.io/medseg/medseg:0.1.0",
        dataset="brats@abc",
        store="s3://medseg",
        run_id="e2e",
        config_uri="s3://medseg/runs/e2e/config.yaml",
        namespace=ns,
        workers=2,
        cpu="1",
        memory="2Gi",
        s3=S3Secret(name=release.s3_secret, config=release.s3_config),
        service_account=release.pipeline_service_account,
        gpus_per_worker=1,
        placement=POOL,  # the GPU pool's, as ci/gpu-pool-values.yaml places training
    )
    # As the chart's pipeline ServiceAccount: a missing permission fails here with 403.
    client = TrainingClient(config_file=str(installed.kubeconfig), namespace=ns)
    # The job's cleanPodPolicy (Running) may delete the worker within a second once kwok has
    # completed the master, faster than any poll: every pod is recorded from a watch that starts
    # at the resourceVersion listed before the job exists, so no pod can be missed.
    from kubernetes import client as k8s
    from kubernetes import config, watch

    selector = f"training.kubeflow.org/job-name={spec.name}"
    core = k8s.CoreV1Api(config.new_client_from_config(str(CL.KUBECONFIG)))
    since = core.list_namespaced_pod(ns, label_selector=selector).metadata.resource_version
    seen: dict[str, dict[str, Any]] = {}
    pods = watch.Watch()

    def record() -> None:
        for event in pods.stream(core.list_namespaced_pod, ns, label_selector=selector,
                                 resource_version=since, timeout_seconds=300):  # fmt: skip
            p = core.api_client.sanitize_for_serialization(event["object"])
            seen[p["metadata"]["labels"]["training.kubeflow.org/replica-type"]] = p

    recorder = threading.Thread(target=record, daemon=True)
    recorder.start()
    try:
        submit_pytorchjob(spec, wait_timeout=240, client=client, stream_logs=True,
                          poll_seconds=2)  # fmt: skip
    finally:
        end = time.monotonic() + 30  # the watch may lag the job's end by a few events
        while sorted(seen) != ["master", "worker"] and time.monotonic() < end:
            time.sleep(0.2)
        pods.stop()
    job = kubectl_json("get", "pytorchjob", spec.name, "-n", ns)
    assert any(c["type"] == "Succeeded" and c["status"] == "True"
               for c in job["status"]["conditions"])  # fmt: skip
    left = {p["metadata"]["labels"]["training.kubeflow.org/replica-type"]: p for p in
            kubectl_json("get", "pods", "-n", ns, "-l", selector)["items"]}  # fmt: skip
    assert left["master"]["status"]["phase"] == "Succeeded"
    assert "worker" not in left or left["worker"]["status"]["phase"] == "Succeeded"
    by_role = {**seen, **left}
    assert sorted(by_role) == ["master", "worker"]
    for role, pod in by_role.items():
        (container,) = pod["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        rank = "0" if role == "master" else "1"
        assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "1"
        assert env["PET_NODE_RANK"] == rank and env["RANK"] == rank
        assert env["WORLD_SIZE"] == "2"
        assert env["PET_MASTER_ADDR"] == env["MASTER_ADDR"] == f"{spec.name}-master-0"
        assert env["PET_MASTER_PORT"] == env["MASTER_PORT"]
        # The object store comes from the release's Secret and ConfigMap, by reference.
        refs = {e["name"]: e.get("valueFrom", {}) for e in container["env"]}
        assert refs["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "prod-medseg-s3"
        assert refs["S3_ENDPOINT"]["configMapKeyRef"]["name"] == "prod-medseg-s3"
        resources = container["resources"]
        # An extended resource's request defaults to its limit (the API server's defaulting).
        want = {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": "1"}
        assert resources["requests"] == resources["limits"] == want
        # Master and worker on the tainted GPU pool: its selector, its toleration, pull secret.
        assert pod["spec"]["nodeName"] == gpu_pool
        assert pod["spec"]["nodeSelector"] == POOL.node_selector
        assert all(t in pod["spec"]["tolerations"] for t in POOL.tolerations)
        assert pod["spec"]["imagePullSecrets"] == [{"name": "medseg-registry"}]
        assert pod["spec"]["serviceAccountName"] == "prod-medseg-pipeline"
        for c in pod["spec"].get("initContainers", []):  # the operator's init-pytorch
            assert c["securityContext"]["runAsNonRoot"] is True, c["name"]
    # The master's log, read back through the SDK call users run (kwok serves a fixed line).
    logs, _ = client.get_job_logs(spec.name, namespace=ns, is_master=True)
    assert CL.KWOK_LOG_LINE in "".join(logs.values())


def test_pipeline_train_step_submits_the_pytorchjob_as_the_chart_service_account(
    installed: Installed,
    s3_env: None,
    storage: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The KFP train component's function with ``launcher=pytorchjob``, as its pod would run it."""
    from kfp.dsl import Dataset, Metrics, Model

    from components import train_op
    from medseg.config import MedsegConfig
    from medseg.core.storage import join
    from medseg.platform.pipeline_params import (
        DatasetArtifact,
        ModelArtifact,
        PreprocessedArtifact,
        read_ref,
        write_ref,
    )

    release, ns, run_id = installed.release, installed.release.namespace, "kfp-train"
    # kwok runs no container, so no Master writes the run's model record: it is put in place
    # beforehand (what this checks is the cluster side: the job, its pods, their account).
    model_uri = join(bucket, "runs", run_id, "model")
    # The chart's pipeline account: $KUBECONFIG as the kubernetes client read it at import.
    monkeypatch.setattr(
        "kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(installed.kubeconfig)
    )
    image = "ghcr.io/medseg/medseg:0.1.0"
    lineage = {"best": {"epoch": 2, "dice_mean": 0.5}, "files": {"model.pt": "0" * 64}}
    storage.put_json(join(model_uri, "lineage.json"), lineage)
    arts = {n: kind(name=n, uri=str(tmp_path / n)) for n, kind in
            (("dataset", Dataset), ("prep", Dataset), ("model", Model))}  # fmt: skip
    for art in arts.values():
        art.path = art.uri  # a local file, as the KFP launcher maps it
    dataset, prep, model = arts["dataset"], arts["prep"], arts["model"]
    data_prefix = join(bucket, "datasets", "brats", "abc")
    write_ref(dataset, DatasetArtifact(uri=data_prefix, digest="abc", store=bucket,
                                       dataset="brats@abc"))  # fmt: skip
    fingerprint = MedsegConfig().data.fingerprint()
    write_ref(prep, PreprocessedArtifact(uri=join(data_prefix, "preprocessed", fingerprint),
                                         dataset="brats@abc", digest=fingerprint))  # fmt: skip
    train_op.python_func(
        dataset=dataset, preprocessed=prep, config_yaml="", run_id=run_id,
        training={"epochs": 1, "launcher": "pytorchjob", "workers": 2, "image": image,
                  "timeout": 240},
        cluster={"namespace": ns, "release": release.name}, model=model,
        metrics=Metrics(name="metrics", uri=str(tmp_path / "metrics")),
    )  # fmt: skip
    assert read_ref(model, ModelArtifact).uri == model_uri
    job = kubectl_json("get", "pytorchjob", f"medseg-{run_id}", "-n", ns)
    assert any(c["type"] == "Succeeded" and c["status"] == "True"
               for c in job["status"]["conditions"])  # fmt: skip
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert {role: r["replicas"] for role, r in replicas.items()} == {"Master": 1, "Worker": 1}
    # The job's cleanPodPolicy (Running) deletes a worker that kwok has not yet completed when
    # the master has: the master's pod stays, the worker's may be gone. Both roles' pod specs
    # are checked in the job, and every pod that remains.
    pods = kubectl_json("get", "pods", "-n", ns, "-l",
                        f"training.kubeflow.org/job-name=medseg-{run_id}")["items"]  # fmt: skip
    roles = [p["metadata"]["labels"]["training.kubeflow.org/replica-type"] for p in pods]
    assert "master" in roles and set(roles) <= {"master", "worker"}, roles
    config_uri = join(bucket, "runs", run_id, "config.yaml")
    assert storage.exists(config_uri)  # the step stored the run's config for the pods
    specs = [r["template"]["spec"] for r in replicas.values()] + [p["spec"] for p in pods]
    for spec in specs:
        assert spec["serviceAccountName"] == release.pipeline_service_account
        (container,) = spec["containers"]
        assert container["image"] == image
        assert config_uri in container["command"][-1]


def _isvc_spec(release: Release, name: str, mode: str, **kw: Any) -> InferenceServiceSpec:
    metric = {"Standard": "cpu", "Knative": "concurrency"}[mode]
    return InferenceServiceSpec(
        name=name,
        storage_uri="s3://medseg/models/brats/v1",
        image="ghcr.io/medseg/medseg-server:0.1.0",
        namespace=release.namespace,
        service_account=release.predictor_service_account,
        deployment_mode=mode,
        scale_metric=metric,
        scale_target=70 if mode == "Standard" else 1,
        cpu="1",
        memory="2Gi",
        **kw,
    )


def test_deploy_standard_is_reconciled_into_deployment_service_and_hpa(
    installed: Installed,
) -> None:
    from kserve import KServeClient

    client = KServeClient(config_file=str(installed.kubeconfig))
    ns = installed.release.namespace
    # `medseg deploy`, as users run it, with the chart's pipeline ServiceAccount's credentials.
    env = {**os.environ, "KUBECONFIG": str(installed.kubeconfig)}
    done = subprocess.run(
        [sys.executable, "-m", "medseg", "deploy", "s3://medseg/models/brats/v1",
         "--name", "brats", "--namespace", ns,
         "--release", installed.release.name, "--mode", "Standard", "--min-replicas", "2",
         "--max-replicas", "3", "--scale-metric", "cpu", "--scale-target", "70", "--cpu", "1",
         "--cpu-limit", "2", "--memory", "2Gi", "--timeout", "180"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"InferenceService {ns}/brats is Ready: http" in done.stdout
    deployment = kubectl_json("get", "deployment", "brats-predictor", "-n", ns)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "kserve-container"]
    want = client.api_instance.api_client.sanitize_for_serialization(container_security_context())
    assert {k: container["securityContext"][k] for k in want} == want
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "2Gi"}
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
    assert container["image"] == SERVER_IMAGE  # the server image, the CLI's default
    assert pod["serviceAccountName"] == "prod-medseg-predictor"
    assert kubectl("get", "service", "brats-predictor", "-n", ns).returncode == 0
    hpa = kubectl_json("get", "hpa", "brats-predictor", "-n", ns)["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 3)
    # Drained within one grace period, spread over nodes, evicted one replica at a time.
    grace = ServerLimits().grace_period_s
    assert pod["terminationGracePeriodSeconds"] == grace
    assert {"name": "MEDSEG_SERVER_GRACE_PERIOD_S", "value": str(grace)} in container["env"]
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    # The budget selects KServe's predictor pods: the disruption controller counts both.
    eventually(lambda: kubectl_json("get", "pdb", "brats-predictor", "-n", ns).get(
        "status", {}).get("expectedPods") == 2, what="PodDisruptionBudget over 2 pods")  # fmt: skip
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["averageUtilization"] == 70
    # KServe's pod webhook injected the storage initializer, and the restricted level admitted it.
    pods = eventually(lambda: pods_settled(ns, "serving.kserve.io/inferenceservice=brats"))
    (init,) = pods[0]["spec"]["initContainers"]
    assert init["name"] == "storage-initializer"
    assert init["securityContext"]["allowPrivilegeEscalation"] is False
    # A second deploy patches the live service: the HPA follows.
    deploy(_isvc_spec(installed.release, "brats", "Standard", min_replicas=2, max_replicas=5),
           timeout=180, client=client, poll_seconds=1)  # fmt: skip
    eventually(lambda: kubectl_json("get", "hpa", "brats-predictor", "-n", ns)["spec"][
        "maxReplicas"] == 5, what="HPA maxReplicas 5")  # fmt: skip


def test_pipeline_deploy_step_runs_as_the_chart_service_account(installed: Installed) -> None:
    """The KFP deploy component's function, as the pipeline pod would run it on the cluster."""
    ns = installed.release.namespace
    model = "s3://medseg/models/brats/v2"
    call = (
        "from kfp.dsl import Model\n"
        "from components import deploy_op\n"
        "from medseg.platform.pipeline_params import ModelArtifact, write_ref\n"
        "m = Model(name='model', uri='/tmp/medseg-kfp-model'); m.path = m.uri\n"
        f"write_ref(m, ModelArtifact(uri='{model}', digest='0' * 64, run_id='r', dataset='d@v'))\n"
        "print(deploy_op.python_func(model=m, name='brats-kfp', deployment={'target': 'kserve', "
        "'mode': 'Standard', 'min_replicas': 1, 'max_replicas': 2, 'scale_metric': 'cpu', "
        "'scale_target': 60, 'timeout': 180, 'image': 'ghcr.io/medseg/medseg-server:0.1.0', "
        "'cpu': '300m', 'memory': '1Gi', 'cpu_limit': '1'}, "
        f"cluster={{'namespace': '{ns}', 'release': '{installed.release.name}'}}))"
    )
    env = {**os.environ, "KUBECONFIG": str(installed.kubeconfig)}
    done = subprocess.run(
        [sys.executable, "-c", call], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("http")
    deployment = kubectl_json("get", "deployment", "brats-kfp-predictor", "-n", ns)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "prod-medseg-predictor"
    # The step sizes the replicas (the HPA's CPU target is a share of this request).
    (server,) = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                 if c["name"] == "kserve-container"]  # fmt: skip
    assert server["resources"]["requests"] == {"cpu": "300m", "memory": "1Gi"}
    assert server["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}


def test_deploy_surfaces_the_controller_conditions_and_recreates_on_mode_change(
    installed: Installed,
) -> None:
    from kserve import KServeClient

    client = KServeClient(config_file=str(installed.kubeconfig))
    ns = installed.release.namespace
    knative = _isvc_spec(installed.release, "brats-kn", "Knative")
    # No Knative Serving here: the service never becomes Ready, and deploy says why, verbatim.
    with pytest.raises(MedsegError, match="not Ready after 20 s") as failed:
        deploy(knative, timeout=20, client=client, poll_seconds=1)
    live = kubectl_json("get", "inferenceservice", "brats-kn", "-n", ns)
    stuck = [c for c in live["status"]["conditions"] if c["status"] != "True"]
    assert stuck
    for c in stuck:
        assert f"{c['type']}={c['status']} {c.get('reason') or ''}: {c.get('message') or ''}" in (
            str(failed.value)
        )
    standard = _isvc_spec(installed.release, "brats-kn", "Standard")
    with pytest.raises(MedsegError, match="cannot change the deployment mode in place"):
        deploy(standard, timeout=60, client=client)
    deploy(standard, timeout=180, client=client, recreate=True, poll_seconds=1)
    again = kubectl_json("get", "inferenceservice", "brats-kn", "-n", ns)
    assert again["metadata"]["uid"] != live["metadata"]["uid"]
    assert again["metadata"]["annotations"][MODE] == "Standard"


def test_operator_versions_are_checked_from_the_installed_crds(installed: Installed) -> None:
    from kubernetes import config

    api = config.new_client_from_config(str(installed.kubeconfig))
    for operator in MIN_OPERATORS:  # the pinned releases pass, as the chart's SA reads them
        check_operator(operator, api)
    # An InferenceService CRD without the field that KServe 0.16 added: refused, with the reason.
    group = "old.medseg.test"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"inferenceservices.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": "InferenceService", "plural": "inferenceservices",
                      "singular": "inferenceservice", "listKind": "InferenceServiceList"},
            "versions": [{"name": "v1beta1", "served": True, "storage": True, "schema": {
                "openAPIV3Schema": {"type": "object", "properties": {"spec": {
                    "type": "object", "properties": {"predictor": {
                        "type": "object", "properties": {"minReplicas": {"type": "integer"}},
                    }},
                }}},
            }}],
        },
    }  # fmt: skip
    done = kubectl("apply", "-f", "-", stdin=json.dumps(crd))
    assert done.returncode == 0, done.stderr
    try:
        kubectl("wait", "--for=condition=Established", f"crd/inferenceservices.{group}")
        old = {"KServe": ("0.16.0", group, "v1beta1", "InferenceService",
                          "spec.predictor.storageUris")}  # fmt: skip
        eventually(lambda: _refused(lambda: check_operator("KServe", api, old)), 30, "OpenAPI")
        with pytest.raises(MedsegError, match=r"KServe >= 0.16.0 is required: .* no spec\."):
            check_operator("KServe", api, old)
        missing = {"KServe": ("0.16.0", "absent.medseg.test", "v1", "InferenceService", "spec")}
        with pytest.raises(MedsegError, match=r"serves no absent\.medseg\.test/v1 API"):
            check_operator("KServe", api, missing)
    finally:
        kubectl("delete", "crd", f"inferenceservices.{group}", "--wait=false")


def _refused(check: Callable[[], None]) -> bool:
    """Whether ``check`` raises (the OpenAPI document follows a new CRD within seconds)."""
    try:
        check()
    except MedsegError as exc:
        return "no spec." in str(exc)
    return False


def test_rbac_grants_exactly_the_calls_the_code_made(installed: Installed) -> None:
    # Run after the launcher and deploy tests: what the code called is in the audit log.
    calls: set[tuple[str, str, str]] = set()
    for line in CL.AUDIT_LOG.read_text().splitlines():
        event = json.loads(line)
        ref = event.get("objectRef")
        if event["user"]["username"] != installed.user or not ref:
            continue
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        calls.add((event["verb"], ref.get("apiGroup", ""), resource))
    assert ("create", "kubeflow.org", "pytorchjobs") in calls
    assert ("create", "serving.kserve.io", "inferenceservices") in calls
    ns = installed.release.namespace
    for verb, group, resource in sorted(calls):
        plural, _, subresource = resource.partition("/")
        what = f"{plural}.{group}" if group else plural
        sub = [f"--subresource={subresource}"] if subresource else []
        can = kubectl("auth", "can-i", verb, what, *sub, "-n", ns, f"--as={installed.user}")
        assert can.stdout.strip() == "yes", (verb, what, sub, can.stdout, can.stderr)
    # The Role grants those calls and nothing more.
    role = kubectl_json("get", "role", f"{installed.release.fullname}-pipeline", "-n", ns)
    granted = {
        (verb, group, resource)
        for rule in role["rules"]
        for verb in rule["verbs"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert granted == calls
    # ... which is medseg.platform.kube.PIPELINE_RULES, the one table the chart's Role is rendered
    # from.
    assert calls == {(v, g, r) for g, r, verbs in PIPELINE_RULES for v in verbs}
    # A verb the code never calls is forbidden, by impersonation and for real.
    for verb, what in (("delete", "secrets"), ("create", "pods"), ("list", "secrets")):
        can = kubectl("auth", "can-i", verb, what, "-n", ns, f"--as={installed.user}")
        assert can.stdout.strip() == "no", (verb, what)
    denied = kubectl("get", "secrets", "-n", ns, kubeconfig=installed.kubeconfig)
    assert denied.returncode != 0 and "Forbidden" in denied.stderr


def test_busy_ports_move_the_cluster_unless_the_range_was_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another checkout's cluster on the default ports: ``up`` takes the next free range."""
    import socket

    monkeypatch.delenv("MEDSEG_CLUSTER_PORT_BASE", raising=False)
    with socket.socket() as held:
        with contextlib.suppress(OSError):  # already held by someone else: busy all the same
            held.bind(("127.0.0.1", CL.DEFAULT_PORT_BASE + 2))
            held.listen()
        base = CL._free_base()
        assert base != CL.DEFAULT_PORT_BASE
        assert CL.DEFAULT_PORT_BASE + 2 not in CL._ports(base).values()
        monkeypatch.setenv("MEDSEG_CLUSTER_PORT_BASE", str(CL.DEFAULT_PORT_BASE))
        with pytest.raises(CL.ClusterError, match="in use; set MEDSEG_CLUSTER_PORT_BASE"):
            CL._free_base()
