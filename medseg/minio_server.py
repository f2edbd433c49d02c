"""Run a real MinIO server on loopback: for tests, the demo and local use.

The server binary is built from source by the set-up step (``go install``, pinned version) into
``.tools/bin/minio``; ``MEDSEG_MINIO_BIN`` or the ``PATH`` can point elsewhere. The server listens
on 127.0.0.1 only, on a free port, with generated credentials. Its data folder and log are the
owner's only (``0700``/``0600``) from the moment they exist, and so is the env file that
:func:`start_local` writes with the credentials.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from medseg.errors import MedsegError
from medseg.settings import StorageSettings

__all__ = [
    "MinioServer",
    "find_minio_binary",
    "free_port",
    "private_dir",
    "read_env_file",
    "start_and_export",
    "start_local",
    "write_env_file",
]

#: Owner-only modes of what holds objects or credentials.
DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) readable by its owner only; tighten it if it exists.

    ``mkdir``'s mode is filtered by the umask, so the mode is set explicitly as well.
    """
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(p, DIR_MODE)
    os.chmod(path, DIR_MODE)
    return path


def write_env_file(path: Path, values: dict[str, str]) -> None:
    """Write ``KEY=VALUE`` lines to ``path``, mode ``0600`` from the start, atomically.

    The file is created by :func:`tempfile.mkstemp` (``0600``) in an owner-only folder and
    renamed into place: at no moment can another user read the credentials.
    """
    folder = path.parent
    if not folder.exists():
        private_dir(folder)
    fd, tmp = tempfile.mkstemp(prefix=".medseg-tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), FILE_MODE)
            fh.write("".join(f"{k}={v}\n" for k, v in values.items()))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_env_file(path: Path) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of an env file (empty when it does not exist)."""
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


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
        private_dir(self.data_dir)
        env = {
            **os.environ,
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_CI_CD": "1",
        }
        log = os.fdopen(  # owned by the child process
            os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE), "ab"
        )
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

    def exit_code(self) -> int | None:
        """The server's exit code once it has exited on its own; ``None`` while it runs."""
        return None if self._proc is None else self._proc.poll()

    def run_until(self, stop: Callable[[], bool], poll: float = 0.5) -> None:
        """Keep the server until ``stop()`` is true; then stop it.

        Raises:
            MedsegError: If the server exits by itself meanwhile (its code and log are named).
        """
        try:
            while not stop():
                code = self.exit_code()
                if code is not None:
                    tail = self.log_path.read_text(errors="replace")[-1000:]
                    raise MedsegError(
                        f"MinIO on {self.endpoint} exited with code {code} "
                        f"(log {self.log_path}):\n{tail}"
                    )
                time.sleep(poll)
        finally:
            self.stop()

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


def start_local(data_dir: Path, port: int | None, bucket: str, env_file: Path) -> MinioServer:
    """Start MinIO for local use, write its env file, create the bucket.

    The credentials of an existing env file are reused, so a restart on the same data works.

    Args:
        data_dir: Where objects are kept (created owner-only).
        port: API port; a free one when ``None``.
        bucket: Bucket to create.
        env_file: Where the endpoint and credentials go (mode ``0600``).

    Returns:
        The running server.
    """
    from medseg.storage import Storage

    creds = read_env_file(env_file)
    server = MinioServer(
        data_dir,
        port=port,
        access_key=creds.get("AWS_ACCESS_KEY_ID"),
        secret_key=creds.get("AWS_SECRET_ACCESS_KEY"),
    ).start()
    try:
        write_env_file(env_file, server.env())
        Storage(server.settings()).ensure_bucket(f"s3://{bucket}")
    except BaseException:
        server.stop()
        raise
    return server


def start_and_export(data_dir: Path, port: int | None, bucket: str) -> MinioServer:
    """:func:`start_local` for this process and what it starts.

    The env file goes where every medseg command reads it (:func:`medseg.settings.env_file_path`)
    and the server's endpoint and credentials go into this process's environment.
    """
    from medseg.settings import env_file_path

    server = start_local(data_dir, port, bucket, env_file_path())
    os.environ.update(server.env())
    return server
