"""The Kubeflow pipeline: compiled structure, cluster objects, and a local run on kfp.local."""

from __future__ import annotations

import io
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

from medseg.core.errors import MedsegError
from medseg.core.storage import Storage, join
from medseg.platform.deploy import InferenceServiceSpec, build_inference_service
from medseg.platform.kube import SERVER_IMAGE
from medseg.platform.launchers import PyTorchJobSpec, S3Secret, build_pytorchjob, submit_pytorchjob
from medseg.platform.pipeline_params import GROUPS
from medseg.platform.pipeline_runner import compile_pipeline, run_local
from pipelines.medseg_pipeline import CACHED, medseg_pipeline
from tests.cluster.k8s import kserve_api_client
from tests.conftest import tiny_config

STEPS = [
    "params",
    "ingest",
    "preprocess",
    "train",
    "predict",
    "evaluate",
    "gate",
    "register",
    "deploy",
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    path = compile_pipeline(medseg_pipeline, tmp_path_factory.mktemp("ir") / "pipeline.yaml")
    return list(yaml.safe_load_all(path.read_text()))


#: The data-parallel steps: a list of shards, a fan-out (a sub-pipeline) before each collect.
FAN_OUTS = {"preprocess": "preprocess-shards", "predict": "predict-shards"}


def test_compiled_pipeline_structure(compiled: list[dict[str, Any]]) -> None:
    spec, platform = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(tasks) == sorted(
        [f"{s}-op" for s in STEPS] + ["shards-op", *FAN_OUTS.values(), "for-loop-1"]
    )
    deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    # each step waits for the one before it
    for before, after in itertools.pairwise(STEPS):
        assert f"{before}-op" in deps[f"{after}-op"], (before, after, deps[f"{after}-op"])
    assert deps["params-op"] == set()
    # each collect step waits for its fan-out: a ParallelFor over the shards step's list
    for step, fan in FAN_OUTS.items():
        assert fan in deps[f"{step}-op"] and "shards-op" in deps[fan]
        (loop,) = spec["components"][f"comp-{fan}"]["dag"]["tasks"].values()
        items = loop["parameterIterator"]["items"]["inputParameter"]
        assert items == "pipelinechannel--shard_list"
        assert tasks[fan]["inputs"]["parameters"]["shard_list"]["taskOutputParameter"] == {
            "outputParameterKey": "Output",
            "producerTask": "shards-op",
        }
    # the shards' records are deleted, shard by shard, once both commits are written
    cleanup = tasks["for-loop-1"]
    assert {"preprocess-op", "predict-op"} <= set(cleanup["dependentTasks"])
    assert not any("for-loop-1" in d for d in deps.values())  # a leaf
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {
        *("source", "dataset_name", "store", "labels", "config_yaml", "task", "threshold"),
        *("model_name", "training", "cluster", "deployment", "shards"),
    }
    assert params["shards"]["defaultValue"] == 1
    # the groups are dict (STRUCT) parameters whose defaults are the library's single definitions
    for group, model in GROUPS.items():
        assert params[group]["parameterType"] == "STRUCT"
        assert model.model_validate(params[group]["defaultValue"]) == model()
    assert params["training"]["defaultValue"]["launcher"] == "local"
    assert params["threshold"]["defaultValue"] == 0.8
    # the predictor runs the model server image, the PyTorchJob the project image
    assert params["deployment"]["defaultValue"]["image"] == SERVER_IMAGE
    assert params["training"]["defaultValue"]["image"] == "ghcr.io/medseg/medseg:0.1.0"
    cached = {n for n, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert (
        cached
        == {f"{step}-op" for step in CACHED}
        == {"preprocess-op", "predict-op", "evaluate-op"}
    )
    # steps hand over typed artifacts: the dataset, the preprocessed data, the model
    artifacts = {
        name: {k: v["taskOutputArtifact"] for k, v in t["inputs"].get("artifacts", {}).items()}
        for name, t in tasks.items()
    }
    assert artifacts["preprocess-op"]["dataset"]["producerTask"] == "ingest-op"
    assert artifacts["train-op"]["preprocessed"]["producerTask"] == "preprocess-op"
    assert artifacts["predict-op"]["model"]["producerTask"] == "train-op"
    assert artifacts["evaluate-op"]["predictions"] == {
        "outputArtifactKey": "predictions",
        "producerTask": "predict-op",
    }
    assert artifacts["register-op"]["evaluation"]["producerTask"] == "evaluate-op"
    assert artifacts["deploy-op"]["model"] == {
        "outputArtifactKey": "registered",
        "producerTask": "register-op",
    }
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # every step but params (which reads no store) gets the S3 Secret and ConfigMap the params
    # step named from the release: they follow cluster.release inside the pipeline
    assert "exec-params-op" not in k8s
    from_params = {"producerTask": "params-op", "outputParameterKey": "s3_secret"}
    for step in ("preprocess-shard", "predict-shard", "clean-shard"):  # inside loops
        secret = k8s[f"exec-{step}-op"]["secretAsEnv"][0]
        assert "secretNameParameter" in secret, step
        res = executors[f"exec-{step}-op"]["container"]["resources"]
        assert res["resourceCpuRequest"] and res["resourceMemoryLimit"]
    for fan in FAN_OUTS.values():  # the sub-pipelines get the params step's S3 names
        names = tasks[fan]["inputs"]["parameters"]
        assert names["s3_secret"]["taskOutputParameter"] == from_params
    for step in STEPS:
        container = executors[f"exec-{step}-op"]["container"]
        assert container["image"] == "ghcr.io/medseg/medseg:0.1.0"
        assert "pip install" not in " ".join(container["command"])  # nothing installed at run
        res = container["resources"]
        assert res["resourceCpuRequest"] and res["resourceMemoryLimit"]
        if step == "params":
            continue
        secret = k8s[f"exec-{step}-op"]["secretAsEnv"][0]
        assert secret["secretNameParameter"] == {"taskOutputParameter": from_params}
        assert {e["envVar"] for e in secret["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        }
        config = k8s[f"exec-{step}-op"]["configMapAsEnv"][0]
        assert config["configMapNameParameter"] == {
            "taskOutputParameter": {**from_params, "outputParameterKey": "s3_config"}
        }
        assert {e["envVar"] for e in config["keyToEnv"]} == {"S3_ENDPOINT", "S3_USE_HTTPS"}
        maps = k8s[f"exec-{step}-op"]["configMapAsEnv"]
        want = ["MLFLOW_TRACKING_URI"]
        (tracking,) = [c for c in maps if [e["envVar"] for e in c["keyToEnv"]] == want]
        assert tracking["optional"] is True
    # no credential value anywhere in the compiled pipeline
    text = yaml.safe_dump(compiled)
    assert "secretKey" in text and "minioadmin" not in text


#: Pipeline parameters that are content, not a location: the run's config and its gate, and
#: the shard count (how the work is split: a sharded step writes what an unsharded one does).
CONTENT_PARAMETERS = {"config_yaml", "task", "threshold", "shards"}


def test_cached_steps_are_keyed_on_content(compiled: list[dict[str, Any]]) -> None:
    """What KFP's cache key of each cached step holds names content, never a location.

    A KFP backend keys a step on its image and command, its input parameter values and its
    input artifacts' MLMD ids (backend/src/v2/cacheutils/cache.go). So a cached step may take
    only parameters that are content (the config, a constant split, the threshold) and
    artifacts; the artifacts it reads are references that name their content (a manifest's
    content hash, a weights sha256: tests/integration/test_components.py), made by uncached
    steps or by cached steps keyed the same way. The one location parameter, ``source``, whose
    content can change under the same name, feeds only the uncached ingest step.
    """
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    cached = {
        n.removesuffix("-op")
        for n, t in tasks.items()
        if t.get("cachingOptions", {}).get("enableCache")
    }
    assert cached == CACHED
    for step in CACHED:
        inputs = tasks[f"{step}-op"]["inputs"]
        for name, value in inputs.get("parameters", {}).items():
            if "componentInputParameter" in value:
                assert value["componentInputParameter"] in CONTENT_PARAMETERS, (step, name)
            elif "taskOutputParameter" in value:  # the run's config, of the run's task
                produced = value["taskOutputParameter"]
                assert produced["producerTask"] == "params-op"
                assert produced["outputParameterKey"] == "config_yaml"
            else:  # a constant (the split)
                assert "constant" in value["runtimeValue"], (step, name, value)
        for name, value in inputs.get("artifacts", {}).items():
            producer = value["taskOutputArtifact"]["producerTask"].removesuffix("-op")
            assert producer in {"ingest", "train"} | CACHED, (step, name, producer)
    for fan in FAN_OUTS.values():  # the shard steps: not cached (they resume from the store)
        (loop,) = spec["components"][f"comp-{fan}"]["dag"]["tasks"].values()
        body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
        assert [t.get("cachingOptions", {}).get("enableCache") for t in body.values()] == [None]
    readers = {
        n for n, t in tasks.items()
        if t["inputs"].get("parameters", {}).get("source", {}).get("componentInputParameter")
    }  # fmt: skip
    assert readers == {"ingest-op"} and "ingest" not in CACHED and "train" not in CACHED


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
        assert "-m medseg.training.train --dataset brats@abc --run-id run-1" in script
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


def test_gate_component_stops_the_run_below_the_threshold() -> None:
    from components import gate_op

    assert gate_op.python_func(passed=True, metric="dice_mean", value=0.91, threshold=0.9) == 0.91
    with pytest.raises(RuntimeError, match=r"quality gate failed: .* 0\.8500 < 0\.9"):
        gate_op.python_func(passed=False, metric="dice_mean", value=0.85, threshold=0.9)


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
# tests/cluster/test_cluster.py::
#     test_deploy_surfaces_the_controller_conditions_and_recreates_on_mode_change


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
        "--param",
        "shards=2",  # preprocess and predict fan out over two shards (ParallelFor)
    ]
    done = _cli(args, pipeline_env, tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    log = done.stdout + done.stderr
    for step in ("preprocess-shard-op", "predict-shard-op", "clean-shard-op"):
        assert log.count(f"Executing task '{step}'") == 2, step
    assert log.index("Executing task 'predict-shard-op'") < log.index("Executing task 'predict-op'")
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
    # the collect steps wrote the one index and predictions.json; the shards' records are gone
    stored = [o.uri for o in storage.list(bucket)]
    (index_uri,) = [u for u in stored if "/preprocessed/" in u and u.endswith("/index.json")]
    index = storage.get_json(index_uri)
    assert len(index["cases"]) == 6 and all(c["shape"] for c in index["cases"])
    assert not [u for u in stored if "/parts/" in u]
    # the KFP artifacts the UI shows: the HTML report and the metrics
    html = list((tmp_path / "root").rglob("evaluate-op/report"))
    assert html and html[0].read_text() == report
    assert "medseg serve --model" in done.stdout + done.stderr


def test_bad_pipeline_parameter_fails_in_the_first_step(
    synth_root: Path, pipeline_env: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    base = ["pipeline", "run", "--local", "--source", str(synth_root / "brats2021")]
    base += ["--store", bucket, "--root", str(tmp_path / "root")]
    # the command line checks the groups before kfp.local starts, naming the field
    done = _cli([*base, "--launcher", "slurm"], pipeline_env, tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Executing task" not in out
    assert "bad pipeline parameter training.launcher: Input should be 'local'" in out
    # more bad --param values: tests/unit/cli/test_cli.py (BAD_INPUT)
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


def test_the_pipeline_checks_its_groups_in_its_first_step(
    pipeline_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arguments that skip the command line (a KFP UI run) stop in the params step."""
    for key, value in pipeline_env.items():
        monkeypatch.setenv(key, value)
    log = io.StringIO()
    with pytest.raises(MedsegError, match=r"pipeline step params failed: .*training\.workers"):
        run_local(
            medseg_pipeline,
            {"source": str(tmp_path / "never-read"), "training": {"workers": 0}},
            tmp_path / "root",
            sink=log,
        )
    assert "Executing task 'params-op'" in log.getvalue()
    assert "Executing task 'ingest-op'" not in log.getvalue()


def test_steps_are_placed_as_the_release_configmap_says(tmp_path: Path) -> None:
    """Compiled with the ConfigMap's placement (as the chart's upload Job does): every step gets
    the steps' block, a GPU train step the training pool's with an nvidia.com/gpu accelerator,
    and the train and deploy steps read the placement of the pods they create at run time."""
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}  # fmt: skip
    env = {
        **os.environ,
        "MEDSEG_PLACEMENT__STEPS": json.dumps(
            {"nodeSelector": {"medseg.io/pool": "cpu"}, "imagePullSecrets": ["reg"],
             "affinity": {"nodeAffinity": affinity}}
        ),
        "MEDSEG_PLACEMENT__TRAINING": json.dumps(
            {"nodeSelector": {"medseg.io/pool": "gpu"}, "tolerations": [gpu],
             "imagePullSecrets": ["reg"], "priorityClassName": "training"}
        ),
        "MEDSEG_PLACEMENT__TRAIN_STEP_GPUS": "2",
    }  # fmt: skip
    out = tmp_path / "pipeline.yaml"
    code = (
        "import sys; from pathlib import Path\n"
        "from medseg.platform.pipeline_runner import compile_pipeline\n"
        "from pipelines.medseg_pipeline import medseg_pipeline\n"
        "compile_pipeline(medseg_pipeline, Path(sys.argv[1]))\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    spec, platform = yaml.safe_load_all(out.read_text())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    executors = spec["deploymentSpec"]["executors"]

    def placed(step: str) -> tuple[Any, ...]:
        config = k8s[f"exec-{step}-op"]
        affinities = config.get("nodeAffinity", [])
        return (
            config["nodeSelector"]["nodeSelectorJson"]["runtimeValue"]["constant"],
            config.get("tolerations", []),
            [a["nodeAffinityJson"]["runtimeValue"]["constant"] for a in affinities],
            [s["secretName"] for s in config["imagePullSecret"]],
        )

    for step in STEPS:
        resources = executors[f"exec-{step}-op"]["container"]["resources"]
        if step == "train":
            assert placed(step) == ({"medseg.io/pool": "gpu"}, [gpu], [], ["reg"])
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "2"
        else:  # CPU steps: the CPU pool, no GPU toleration, no accelerator
            assert placed(step) == ({"medseg.io/pool": "cpu"}, [], [affinity], ["reg"]), step
            assert "accelerator" not in resources, step
    for step, key in (("train", "TRAINING"), ("deploy", "PREDICTOR")):
        optional = [c for c in k8s[f"exec-{step}-op"]["configMapAsEnv"] if c["optional"]]
        assert [e["envVar"] for c in optional for e in c["keyToEnv"]] == [
            f"MEDSEG_PLACEMENT__{key}",
            "MLFLOW_TRACKING_URI",
        ]
    optional = [c for c in k8s["exec-ingest-op"]["configMapAsEnv"] if c["optional"]]
    assert [e["envVar"] for c in optional for e in c["keyToEnv"]] == ["MLFLOW_TRACKING_URI"]
