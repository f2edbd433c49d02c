"""The local MinIO: owner-only data and credentials, and `medseg minio` failing when MinIO dies."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

from medseg.apps.minio_server import read_env_file, write_env_file


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def test_medseg_minio_keeps_secrets_private_and_exits_when_minio_dies(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg"
    env = {**os.environ, "MEDSEG_ENV_FILE": str(cfg / "minio.env")}
    for key in ("S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key, None)
    old = os.umask(0o022)  # the usual umask: what is not made private explicitly is readable
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "medseg",
                "minio",
                "--data-dir",
                str(cfg / "data"),
                "--port",
                "0",
                "--bucket",
                "local-bucket",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
    finally:
        os.umask(old)
    try:
        assert proc.stdout is not None
        lines = []
        while not any("MinIO on" in line for line in lines):
            line = proc.stdout.readline()
            assert line, f"medseg minio ended early: {''.join(lines)}"
            lines.append(line)
        assert _mode(cfg) == 0o700
        assert _mode(cfg / "data") == 0o700
        assert _mode(cfg / "minio.env") == 0o600
        assert {_mode(p) for p in cfg.glob("minio-*.log")} == {0o600}
        assert read_env_file(cfg / "minio.env")["AWS_SECRET_ACCESS_KEY"]

        minio = [
            p for p in _children(proc.pid) if b"minio" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        assert len(minio) == 1
        os.kill(minio[0], signal.SIGKILL)  # MinIO crashes (OOM-killed, say)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode != 0
        assert "exited with code" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_env_file_is_private_even_over_a_readable_one(tmp_path: Path) -> None:
    path = tmp_path / "minio.env"
    path.write_text("OLD=1\n")
    path.chmod(0o644)
    write_env_file(path, {"AWS_SECRET_ACCESS_KEY": "s3cret"})
    assert _mode(path) == 0o600
    assert read_env_file(path) == {"AWS_SECRET_ACCESS_KEY": "s3cret"}
    assert [p.name for p in tmp_path.iterdir()] == ["minio.env"]  # no temporary file left
