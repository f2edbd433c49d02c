"""Experiment tracking on a real MLflow server (artifacts in the real MinIO): runs, resumes, outages."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from medseg.config import REGIONS
from medseg.ingest import ingest
from medseg.minio_server import free_port
from medseg.mlflow_server import MlflowServer
from medseg.preprocess import preprocess
from medseg.settings import TrackingSettings
from medseg.storage import Storage, join
from medseg.tracking import MLFLOW_FILE, RUN_TAG, RunTracker, client, mlflow_run_of
from medseg.train import train

from .conftest import tiny_config


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


def test_a_resumed_run_continues_the_same_mlflow_run(
    dataset: str, storage: Storage, tracking_env: str, mlflow_server: MlflowServer
) -> None:
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


def test_training_finishes_when_the_server_is_unreachable(
    dataset: str,
    storage: Storage,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MEDSEG_TRACKING_FLUSH_S", "1")
    monkeypatch.setenv("MEDSEG_TRACKING_BUFFER", "5")
    result = train("t", dataset, "run-down", _cfg(2), storage=storage)
    assert [h["epoch"] for h in result.history] == [1, 2]
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
    """SIGKILL the tracking server once the run's first epoch reached it; training goes on."""
    bucket = dataset.removeprefix("s3://")
    server = MlflowServer(bucket, minio_server.settings(), tmp_path / "mlflow.db").start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        monkeypatch.setenv("MEDSEG_TRACKING_FLUSH_S", "2")
        results: list = []
        worker = threading.Thread(
            target=lambda: results.append(train("t", dataset, "run-k", _cfg(6), storage=storage))
        )
        worker.start()
        mlflow = client(TrackingSettings(uri=server.uri))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and worker.is_alive():
            recorded = mlflow_run_of(storage, join(dataset, "runs", "run-k"))
            if recorded and mlflow.get_metric_history(recorded["run_id"], "loss"):
                break
            time.sleep(0.5)
        assert worker.is_alive(), "training ended before the server could be killed"
        server.kill()
        worker.join(600)
        assert results and [h["epoch"] for h in results[0].history] == list(range(1, 7))
        lost, _ = _lost(capfd.readouterr().err)
        assert lost > 0
    finally:
        server.stop()
