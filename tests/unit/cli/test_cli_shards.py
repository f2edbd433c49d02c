"""``medseg preprocess`` and ``medseg predict`` run as shards: ``--shards K --shard I``, then
``--collect``, through typer's CliRunner on a real MinIO."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medseg.cli import app
from medseg.core.storage import Storage, join
from medseg.data.ingest import ingest
from tests.conftest import write_tiny_model

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def test_preprocess_runs_as_shards_then_collects(
    synth_root: Path, storage: Storage, bucket: str, s3_env: None
) -> None:
    ingest(str(synth_root / "brats2021"), "sh", bucket, storage=storage)
    config = storage.put_bytes(join(bucket, "configs", "c.yaml"), b"data: {}\n").uri
    base = ("preprocess", "-d", "sh", "--store", bucket, "--workers", "1", "--shards", "2")
    base += ("--config", config)  # a pod reads its config from the store
    code, out = _run(*base, "--shard", "0")
    assert code == 0, out
    assert "shard 0 of 2: 3 cases, 3 computed, 0 already done" in out
    assert "medseg preprocess -d sh --shards 2 --collect" in out
    code, out = _run(*base, "--collect")  # shard 1 has not run: nothing is written
    assert code == 1 and "shard 1 of 2: BraTS2021_00001, BraTS2021_00003" in out, out
    code, out = _run(*base, "--shard", "1")
    assert code == 0 and "3 computed" in out, out
    code, out = _run(*base, "--shard", "1")  # a rerun finds its cases done
    assert code == 0 and "0 computed, 3 already done" in out, out
    code, out = _run(*base, "--collect")
    assert code == 0 and "collected 6 of 6 cases into" in out, out
    code, out = _run("preprocess", "-d", "sh", "--store", bucket, "--workers", "1")
    assert code == 0 and "all 6 cases already preprocessed (no-op)" in out, out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shards", "2"], "run each shard with --shard 0 … --shard 1"),
        (["--shards", "2", "--shard", "2"], "--shard 2 is not one of 0…1"),
        (["--shards", "2", "--shard", "0", "--collect"], "not both"),
    ],
)
def test_shard_options_misused_are_named(
    args: list[str], message: str, bucket: str, s3_env: None
) -> None:
    for command in (["preprocess", "-d", "x"], ["predict", "-d", "x", "--model", "m"]):
        code, out = _run(*command, "--store", bucket, *args)
        assert code == 1 and message in out and "Traceback" not in out, out


def test_predict_runs_as_shards_then_collects(
    synth_root: Path, storage: Storage, bucket: str, s3_env: None, tmp_path: Path
) -> None:
    ingest(str(synth_root / "brats2021"), "ps", bucket, storage=storage)
    model = str(write_tiny_model(tmp_path / "model"))
    out_uri = join(bucket, "sharded")
    base = ("predict", "-d", "ps", "--model", model, "--split", "all", "--store", bucket)
    base += ("--out", out_uri, "--shards", "2")
    code, out = _run(*base, "--shard", "1")
    assert code == 0 and "shard 1 of 2: 3 cases, 3 computed, 0 already done" in out, out
    code, out = _run(*base, "--collect")
    assert code == 1 and "no shard record for 3 cases (shard 0 of 2: " in out, out
    assert not storage.exists(join(out_uri, "predictions.json"))
    code, out = _run(*base, "--shard", "0")
    assert code == 0 and "3 computed" in out, out
    code, out = _run(*base, "--collect")
    assert code == 0 and "tumour volumes (mL) · 6 cases" in out, out
    rows = storage.get_json(join(out_uri, "predictions.json"))["cases"]
    assert sorted(r["case_id"] for r in rows) == [f"BraTS2021_{i:05d}" for i in range(6)]
    code, out = _run("predict", "--url", "http://127.0.0.1:1", "--shards", "2", "--collect")
    assert code == 1 and "give --model and --dataset only" in out, out
