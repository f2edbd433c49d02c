"""Experiment tracking on a real MLflow server (artifacts in the real MinIO)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from medseg.apps.minio_server import free_port
from medseg.apps.mlflow_server import MlflowServer
from medseg.config import REGIONS
from medseg.core.settings import TrackingSettings
from medseg.core.storage import Storage, join
from medseg.data.ingest import ingest
from medseg.data.preprocess import preprocess
from medseg.registry.tracking import MLFLOW_FILE, RUN_TAG, RunTracker, client, mlflow_run_of
from medseg.training.train import train
from tests.conftest import tiny_config, write_run_model


def _cfg(epochs: int):
    return tiny_config(train={"lr": 2e-3, "epochs": epochs})


@pytest.fixture
def dataset(synth_root: Path, storage: Storage, bucket: str, s3_env: None) -> str:
    ingest(str(synth_root / "brats2021"), "t", bucket, storage=storage)
    preprocess("t", bucket, _cfg(1).data, storage=storage, progress=False)
    return bucket


def _lost(stderr: str) -> tuple[int, int]:
    """(metric values lost, of those dropped) from the tracker's closing warning."""
    m = re.search(r"(\d+) metric values lost \((\d+) dropped", stderr)
    assert m, stderr
    return int(m.group(1)), int(m.group(2))


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_mlflow_run(
    dataset: str, storage: Storage, tracking_env: str, mlflow_server: MlflowServer
) -> None:
    """Train 2 epochs, resume for 2 more: one MLflow run, 4 epoch points, steps contiguous.

    Then the run's evaluation lands in the same MLflow run.
    """
    first = train("t", dataset, "run-mlf", _cfg(2), storage=storage)
    recorded = mlflow_run_of(storage, first.run_prefix)
    assert recorded is not None and recorded["tracking_uri"] == mlflow_server.uri
    # a new process would find the run by its id next to the checkpoints: the same code path
    second = train("t", dataset, "run-mlf", _cfg(4), storage=storage)
    assert second.resumed_from == 2

    mlflow = client(TrackingSettings())
    experiment = mlflow.get_experiment_by_name(tracking_env)
    runs = mlflow.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "a resume must not start a second MLflow run"
    run = runs[0]
    assert run.info.run_id == recorded["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags[RUN_TAG] == "run-mlf"
    assert run.data.tags["medseg.dataset"].startswith("t@")
    assert run.data.tags["medseg.preprocessing"] == _cfg(1).data.fingerprint()
    assert run.data.tags["medseg.launcher"] and run.data.tags["medseg.image"]
    assert run.data.tags["medseg.git_revision"]
    assert run.data.params["train.lr"] == "0.002"
    assert run.data.params["train.epochs"] == "2"  # as first logged; the resume's value:
    assert run.data.tags["medseg.resumed_with.train.epochs"] == "4"

    def steps(key: str) -> list[int]:
        return [m.step for m in mlflow.get_metric_history(run.info.run_id, key)]

    assert sorted(steps("loss")) == [1, 2, 3, 4]
    for region in REGIONS:
        assert sorted(steps(f"dice_{region.lower()}")) == [1, 2, 3, 4]
    assert sorted(steps("lr")) == [1, 2, 3, 4]
    per_step = sorted(steps("step/loss"))
    assert per_step == list(range(1, len(per_step) + 1)) and len(per_step) % 4 == 0
    assert len(steps("step/samples_per_second")) == len(per_step)

    names = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert {"model.yaml", "curves.png"} <= names
    # served by the tracking server from the platform's bucket (the client has no S3 keys)
    stored = [o.uri for o in storage.list(f"{mlflow_server.artifacts}/")]
    assert any(u.endswith(f"{run.info.run_id}/artifacts/model.yaml") for u in stored)
    lineage = storage.get_json(join(first.run_prefix, "model", "lineage.json"))
    assert lineage["mlflow"]["run_id"] == run.info.run_id

    from medseg.evaluation.evaluate import evaluate
    from medseg.inference.predict import predict

    model = join(first.run_prefix, "model")
    split = predict(model, dataset="t", store=dataset, storage=storage)
    scored = evaluate(model, split.out, storage=storage)
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert logged["eval/validation/dice_mean"] == pytest.approx(scored.dice_mean)
    for region in REGIONS:
        assert logged[f"eval/validation/dice_{region.lower()}"] == pytest.approx(
            scored.dice[region]
        )
    files = {a.path for a in mlflow.list_artifacts(run.info.run_id, "eval/validation")}
    assert {"cases.json", "report.html", "metrics.json"} <= {f.rsplit("/", 1)[1] for f in files}
    local = mlflow.download_artifacts(run.info.run_id, "eval/validation/cases.json")
    table = json.loads(Path(local).read_text())  # log_table's format: columns and rows
    assert len(table["data"]) == len(scored.cases)


def test_training_finishes_when_the_server_is_unreachable(
    dataset: str,
    storage: Storage,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MEDSEG_TRACKING_FLUSH_S", "1")
    monkeypatch.setenv("MEDSEG_TRACKING_BUFFER", "5")
    result = train("t", dataset, "run-down", _cfg(1), storage=storage)
    assert [h["epoch"] for h in result.history] == [1]
    assert storage.exists(join(result.run_prefix, "model", "lineage.json"))
    err = capfd.readouterr().err
    assert "unreachable" in err and "training goes on" in err
    lost, dropped = _lost(err)
    assert dropped > 0 and lost >= dropped + 5  # the buffer held 5, the rest were dropped
    assert "model.yaml" in err and "curves.png" in err  # the artifacts that were lost
    assert not storage.exists(join(result.run_prefix, MLFLOW_FILE))


def test_the_buffer_is_bounded_while_the_server_is_away(storage: Storage, bucket: str) -> None:
    settings = TrackingSettings(uri=f"http://127.0.0.1:{free_port()}", buffer=100, flush_s=0)
    tracker = RunTracker(settings, storage, join(bucket, "runs", "r"), "r", {}, {})
    for step in range(5000):
        tracker.log_metrics({"a": 1.0, "b": 2.0}, step)
        assert len(tracker._pending.metrics) <= 100
    lost = tracker.close()
    assert lost["metrics"] == 10_000 and lost["dropped"] >= 9_900


@pytest.mark.slow
def test_training_finishes_when_the_server_dies_mid_run(
    dataset: str,
    storage: Storage,
    minio_server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The server is SIGKILLed after the run's first epochs reached it; training goes on.

    Deterministic: 2 epochs reach the server, it dies, the run is resumed for 2 more (the
    tracker retries, then reports what it lost), the server comes back on the same database
    and the run's last 2 epochs go to the same MLflow run.
    """
    bucket = dataset.removeprefix("s3://")
    server = MlflowServer(bucket, minio_server.settings(), tmp_path / "mlflow.db").start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        monkeypatch.setenv("MEDSEG_TRACKING_FLUSH_S", "3")
        train("t", dataset, "run-k", _cfg(2), storage=storage)
        recorded = mlflow_run_of(storage, join(dataset, "runs", "run-k"))
        assert recorded is not None
        server.kill()
        assert not server.is_ready(), "the server (uvicorn under mlflow) still answers"
        capfd.readouterr()
        result = train("t", dataset, "run-k", _cfg(4), storage=storage)
        assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
        err = capfd.readouterr().err
        assert "unreachable" in err and "training goes on" in err
        lost, _ = _lost(err)
        assert lost > 0

        server.start()  # same port and database: what reached it before it died is there
        mlflow = client(TrackingSettings(uri=server.uri))
        history = mlflow.get_metric_history(recorded["run_id"], "loss")
        assert sorted(m.step for m in history) == [1, 2]
        train("t", dataset, "run-k", _cfg(6), storage=storage)
        history = mlflow.get_metric_history(recorded["run_id"], "loss")
        assert sorted(m.step for m in history) == [1, 2, 5, 6]  # 3 and 4 were lost, reported
        assert len(mlflow.search_runs([recorded["experiment_id"]])) == 1
    finally:
        server.stop()


def _finished_run(storage: Storage, store: str, run_id: str, experiment: str) -> str:
    """A run's model folder as training leaves it, tracked in MLflow; its MLflow run id."""
    write_run_model(storage, store, run_id, tiny_config().to_yaml().encode())
    mlflow = client(TrackingSettings())
    exp = mlflow.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(experiment)
    run = mlflow.create_run(exp_id, tags={RUN_TAG: run_id})
    storage.put_json(
        join(store, "runs", run_id, MLFLOW_FILE),
        {
            "tracking_uri": TrackingSettings().uri,
            "experiment_id": exp_id,
            "run_id": run.info.run_id,
        },
    )
    return run.info.run_id


def _evaluation(storage: Storage, store: str, run_id: str, passed: bool) -> str:
    uri = join(store, "runs", run_id, "eval", "metrics.json")
    dice = {r: 0.9 if passed else 0.1 for r in REGIONS}
    storage.put_json(
        uri,
        {
            "dataset": "d@0123456789abcdef",
            "split": "validation",
            "dice": dice,
            "hd95": {r: 1.0 for r in REGIONS},
            "dice_mean": 0.9 if passed else 0.1,
            "gate": {"threshold": 0.8, "passed": passed},
        },
    )
    return uri


def test_register_writes_both_registries_and_the_champion_follows_the_gate(
    storage: Storage, bucket: str, tracking_env: str
) -> None:
    from medseg.registry.register import register
    from medseg.registry.tracking import CHAMPION, RegistryMismatch, set_champion, verify_version

    name = f"m-{tracking_env}"
    mlflow_run = _finished_run(storage, bucket, "r1", tracking_env)
    card = register(storage, bucket, "r1", name, _evaluation(storage, bucket, "r1", True))
    card_uri = join(bucket, "models", name, "v1", "model_card.json")
    assert storage.get_json(card_uri) == card
    assert card["mlflow"]["run_id"] == mlflow_run and card["mlflow"]["name"] == name
    mlflow = client(TrackingSettings())
    version = mlflow.get_model_version(name, card["mlflow"]["version"])
    assert version.run_id == mlflow_run
    assert version.source == join(bucket, "models", name, "v1")
    assert version.tags["medseg.version"] == "v1"
    assert version.tags["medseg.model_card"] == card_uri
    assert version.tags["medseg.sha256.model.pt"] == card["files"]["model.pt"]
    assert version.tags["medseg.sha256.model.yaml"] == card["files"]["model.yaml"]
    assert mlflow.get_model_version_by_alias(name, CHAMPION).version == version.version

    # a version below the gate is registered in both, but the champion stays where it was
    _finished_run(storage, bucket, "r2", tracking_env)
    second = register(storage, bucket, "r2", name, _evaluation(storage, bucket, "r2", False))
    assert second["version"] == "v2" and second["mlflow"]["version"] != version.version
    assert mlflow.get_model_version_by_alias(name, CHAMPION).version == version.version
    verify_version(storage, join(bucket, "models", name, "v2", "model_card.json"))

    # break MLflow's side on purpose: the disagreement is named, the alias refuses to move
    v2_card = join(bucket, "models", name, "v2", "model_card.json")
    mlflow.set_model_version_tag(
        name, second["mlflow"]["version"], "medseg.sha256.model.pt", "0" * 64
    )
    with pytest.raises(RegistryMismatch, match=r"medseg\.sha256\.model\.pt"):
        set_champion(storage, v2_card)
    assert mlflow.get_model_version_by_alias(name, CHAMPION).version == version.version

    # break medseg's side: a stored file that no longer matches its card is detected
    from medseg.core.errors import ChecksumMismatch

    storage.put_bytes(join(bucket, "models", name, "v1", "model.pt"), b"tampered")
    with pytest.raises(ChecksumMismatch):
        verify_version(storage, card_uri)


def test_register_is_refused_when_mlflow_cannot_be_written(
    storage: Storage, bucket: str, tracking_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg.registry.register import list_models, register
    from medseg.registry.tracking import TrackingError

    _finished_run(storage, bucket, "r1", tracking_env)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TrackingError, match="refused the version"):
        register(storage, bucket, "r1", "m")
    assert list_models(storage, bucket, "m") == []  # no card: no medseg version without MLflow's


def _group(pgid: int) -> list[int]:
    """The processes of a process group (``mlflow server`` and its uvicorn)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.getpgid(int(proc.name)) == pgid:
                    pids.append(int(proc.name))
            except ProcessLookupError:
                continue
    return pids


def test_the_server_gets_its_s3_keys_by_environment_never_argv(
    mlflow_server: MlflowServer, minio_server
) -> None:
    assert mlflow_server.pid is not None
    pids = _group(mlflow_server.pid)
    assert len(pids) >= 2  # mlflow's CLI and the uvicorn it runs
    secret = minio_server.secret_key.encode()
    for pid in pids:
        assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{mlflow_server.pid}/environ").read_bytes().split(b"\0")
    assert b"AWS_SECRET_ACCESS_KEY=" + secret in environ
    assert b"MLFLOW_S3_ENDPOINT_URL=" + minio_server.endpoint.encode() in environ


@pytest.mark.slow
def test_mlflow_command_serves_until_sigterm(minio_server, tmp_path: Path) -> None:
    """``medseg mlflow`` as a real process: it serves, and SIGTERM stops it and its workers."""
    import signal
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    env = {**os.environ, **minio_server.env(), "MEDSEG_ENV_FILE": str(tmp_path / "none.env")}
    argv = ["mlflow", "--db", str(tmp_path / "m.db"), "--port", str(port), "--bucket", "cli"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "medseg", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the server answers /health
        assert f"MLflow on http://127.0.0.1:{port}" in line, line + proc.stdout.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
        mlflow = client(TrackingSettings(uri=f"http://127.0.0.1:{port}"))
        exp = mlflow.create_experiment("cli")
        assert mlflow.get_experiment(exp).artifact_location.startswith("mlflow-artifacts:")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    time.sleep(1)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
