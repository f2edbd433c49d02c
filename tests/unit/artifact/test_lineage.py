"""Lineage on a real store: from any link of the chain, up to the raw data and down to answers."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medseg.artifact.lineage import lineage, raw_fingerprint
from medseg.cli import app
from medseg.core.errors import MedsegError
from medseg.core.storage import Storage, join
from medseg.data.ingest import ingest
from medseg.data.manifest import DatasetRef
from medseg.registry.register import register


def _run(storage: Storage, store: str, run_id: str, ref: DatasetRef) -> None:
    """A run's model folder as training leaves it, trained on ``ref``."""
    model = join(store, "runs", run_id, "model")
    pt = storage.put_bytes(join(model, "model.pt"), f"weights of {run_id}".encode())
    yml = storage.put_bytes(join(model, "model.yaml"), b"model: {}\n")
    storage.put_json(
        join(model, "lineage.json"),
        {
            "run_id": run_id,
            "dataset": {"store": store, "name": ref.name, "version": ref.version},
            "preprocessing": "fp-123",
            "best": {},
            "epochs": 1,
            "files": {"model.pt": pt.sha256, "model.yaml": yml.sha256},
        },
    )


def test_lineage_walks_both_ways_from_every_link(
    synth_root: Path,
    storage: Storage,
    bucket: str,
    s3_env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ingest(str(synth_root / "brats2021"), "lin", bucket, storage=storage)
    ref = DatasetRef.resolve(storage, bucket, "lin")
    raw = raw_fingerprint(ref.load(storage))
    _run(storage, bucket, "run-1", ref)
    _run(storage, bucket, "run-other", ref.model_copy(update={"name": "elsewhere"}))
    card = register(storage, bucket, "run-1", "lm")
    model_prefix = join(bucket, "models", "lm", card["version"])
    preds = join(bucket, "predictions", "batch-1", "predictions.json")
    storage.put_json(preds, {"model": model_prefix, "cases": []})

    for start in (str(ref), "run-1", "lm@v1", preds):
        found = lineage(storage, bucket, start, cluster=False)
        assert found.datasets == {str(ref): raw}, start
        assert list(found.runs) == ["run-1"], start  # not the run of another dataset
        assert list(found.models) == ["lm@v1"], start
        assert found.predictions == {preds: "lm@v1"}, start
        text = "\n".join(found.lines())
        assert "fp-123" in text and card["files"]["model.pt"] in text

    with pytest.raises(MedsegError, match="no dataset version, run, registered model"):
        lineage(storage, bucket, "nothing-here", cluster=False)

    # no cluster to read: the chain still prints, and says why deployments are missing
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    r = CliRunner().invoke(app, ["lineage", "run-1", "--store", bucket])
    assert r.exit_code == 0, r.output
    assert f"raw data {raw} → dataset {ref}" in r.output
    assert "model lm@v1" in r.output and "cluster not reachable" in r.output
    assert f"predictions {preds}" in r.output
