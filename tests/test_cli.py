"""The medseg CLI through typer's CliRunner, and `medseg minio` as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medseg.cli import app
from medseg.minio_server import free_port
from medseg.settings import StorageSettings
from medseg.storage import Storage

runner = CliRunner()


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tables wrap to the terminal; give the captured one room so assertions see whole words.
    from medseg import cli

    monkeypatch.setattr(cli.console, "width", 200)


def test_synth_ingest_preprocess_list(tmp_path: Path, s3_env: None, bucket: str) -> None:
    raw = tmp_path / "raw"
    r = runner.invoke(
        app, ["synth", str(raw), "--layout", "msd", "--cases", "3", "--shape", "40", "40", "24"]
    )
    assert r.exit_code == 0, r.output
    assert "wrote 3 msd cases" in r.output

    r = runner.invoke(app, ["ingest", str(raw), "--dataset", "cli", "--store", bucket])
    assert r.exit_code == 0, r.output
    assert "3 valid cases (2 train, 1 validation)" in r.output and "stored" in r.output
    r = runner.invoke(app, ["ingest", str(raw), "--dataset", "cli", "--store", bucket])
    assert "already stored (no-op)" in r.output and "0 files uploaded" in r.output

    r = runner.invoke(
        app, ["preprocess", "--dataset", "cli@latest", "--store", bucket, "--workers", "1"]
    )
    assert r.exit_code == 0, r.output
    assert "preprocessed 3 of 3 cases" in r.output
    r = runner.invoke(app, ["preprocess", "--dataset", "cli", "--store", bucket, "--workers", "1"])
    assert "already preprocessed (no-op)" in r.output

    r = runner.invoke(app, ["datasets", "list", "--store", bucket])
    assert r.exit_code == 0 and "cli" in r.output and "msd" in r.output


def test_quarantine_is_listed(tmp_path: Path, s3_env: None, bucket: str, synth_root: Path) -> None:
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(synth_root / "brats2021", raw)
    (raw / "BraTS2021_00002" / "BraTS2021_00002_flair.nii.gz").unlink()
    r = runner.invoke(app, ["ingest", str(raw), "-d", "q", "--store", bucket])
    assert r.exit_code == 0, r.output
    assert "1 quarantined cases" in r.output and "BraTS2021_00002" in r.output
    assert "missing modality flair" in r.output


def test_errors_are_one_clear_line(
    tmp_path: Path, s3_env: None, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = runner.invoke(app, ["ingest", str(tmp_path / "absent"), "-d", "x", "--store", bucket])
    assert r.exit_code == 1 and "is not a folder" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["preprocess", "-d", "nope", "--store", bucket])
    assert r.exit_code == 1 and "has no versions" in r.output
    monkeypatch.setenv("S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MEDSEG_S3_RETRY_SECONDS", "1")
    r = runner.invoke(app, ["datasets", "list", "--store", bucket])
    assert r.exit_code == 1 and "unreachable" in r.output and "Traceback" not in r.output
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in r.output


def test_minio_command_serves_and_writes_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "minio.env"
    env = {**os.environ, "MEDSEG_ENV_FILE": str(env_file)}
    for var in ("S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medseg",
            "minio",
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            "0",
            "--bucket",
            "local",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            time.sleep(0.2)
        assert env_file.stat().st_mode & 0o777 == 0o600
        settings = StorageSettings(_env_file=env_file)  # type: ignore[call-arg]
        assert settings.endpoint and settings.endpoint.startswith("http://127.0.0.1:")
        storage = Storage(settings)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the bucket is created right after the env file
            try:
                storage.put_bytes("s3://local/hello", b"hi")
                break
            except Exception:
                time.sleep(0.2)
        assert storage.get_bytes("s3://local/hello") == b"hi"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
