"""Run a real MinIO server on loopback: for tests, the demo and local use.

The server binary is built from source by the set-up step (``go install``, pinned version) into
``.tools/bin/minio``; ``MEDSEG_MINIO_BIN`` or the ``PATH`` can point elsewhere. The server listens
on 127.0.0.1 only, on a free port, with generated credentials.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from medseg.errors import MedsegError
from medseg.settings import StorageSettings

__all__ = ["MinioServer", "find_minio_binary", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_minio_binary() -> Path:
    """Locate the ``minio`` server binary.

    Raises:
        MedsegError: If it is nowhere to be found (the set-up step builds it).
    """
    candidates = [os.environ.get("MEDSEG_MINIO_BIN")]
    here = Path(__file__).resolve().parent.parent / ".tools" / "bin" / "minio"
    candidates += [str(Path.cwd() / ".tools" / "bin" / "minio"), str(here), shutil.which("minio")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise MedsegError(
        "MinIO server binary not found: run `make setup` (it builds .tools/bin/minio), "
        "or set MEDSEG_MINIO_BIN"
    )


def _pdeathsig_applies() -> bool:
    """Whether to ask for the parent-death signal: on Linux, from the main thread only.

    The kernel signals the child when the *thread* that forked it ends, so a server started from
    a helper thread must not carry it.
    """
    import threading

    return (
        sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
    )


def _die_with_parent() -> None:
    """In the MinIO child, before exec: SIGTERM it when its parent dies (Linux ``prctl``).

    A demo or test process killed with SIGKILL or SIGTERM runs no ``finally``; without this its
    MinIO would keep running, holding its port and data directory.
    """
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class MinioServer:
    """A MinIO server process bound to 127.0.0.1.

    Args:
        data_dir: Folder the server stores objects in.
        port: API port; a free one when omitted. Kept across :meth:`stop`/:meth:`start`.
        access_key: Root user; generated when omitted.
        secret_key: Root password; generated when omitted.
        binary: Server binary; found by :func:`find_minio_binary` when omitted.
    """

    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        binary: str | Path | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.console_port = free_port()
        self.access_key = access_key or f"medseg-{secrets.token_hex(4)}"
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.binary = Path(binary) if binary else find_minio_binary()
        self.log_path = self.data_dir.parent / f"minio-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def settings(self, **overrides: object) -> StorageSettings:
        """Storage settings that reach this server."""
        values: dict[str, object] = {
            "endpoint": self.endpoint,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "use_https": False,
            "region": "us-east-1",
        }
        values.update(overrides)
        return StorageSettings(**values)  # type: ignore[arg-type]

    def env(self) -> dict[str, str]:
        """The environment variables other processes use to reach this server."""
        return {
            "S3_ENDPOINT": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,
            "S3_USE_HTTPS": "0",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> MinioServer:
        """Start the server and wait until it reports ready.

        Raises:
            MedsegError: If it exits or is not ready within ``timeout`` seconds.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_CI_CD": "1",
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self._proc = subprocess.Popen(
            [
                str(self.binary),
                "server",
                str(self.data_dir),
                "--address",
                f"127.0.0.1:{self.port}",
                "--console-address",
                f"127.0.0.1:{self.console_port}",
                "--quiet",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if _pdeathsig_applies() else None,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                lines = self.log_path.read_text(errors="replace").splitlines()
                fatal = [x.strip() for x in lines if "FATAL" in x or "ERROR" in x] or lines[-1:]
                raise MedsegError(
                    f"MinIO on 127.0.0.1:{self.port} exited with code {self._proc.returncode}: "
                    f"{' '.join(fatal)[-500:]} (log: {self.log_path})"
                )
            if self.is_ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise MedsegError(f"MinIO on {self.endpoint} not ready after {timeout:.0f}s")

    def is_ready(self) -> bool:
        """Whether the server answers its readiness probe."""
        try:
            with urllib.request.urlopen(f"{self.endpoint}/minio/health/ready", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> None:
        """Stop the server (its data stays in ``data_dir``)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """Kill the server abruptly, as a crashed or preempted pod would go."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> MinioServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
