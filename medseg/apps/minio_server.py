"""Run a real MinIO server on loopback: for tests, the demo and local use.

The server binary is built from source by the set-up step (``go install``, pinned version) into
``.tools/bin/minio``; ``MEDSEG_MINIO_BIN`` or the ``PATH`` can point elsewhere. The server listens
on 127.0.0.1 only, on a free port, with generated credentials (its lifecycle:
:class:`medseg.apps.local_server.LocalServer`). Its data folder and log are the owner's only
(``0700``/``0600``) from the moment they exist, and so is the env file that :func:`start_local`
writes with the credentials. ``free_port`` and ``private_dir`` are re-exported from there.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

from medseg.apps.local_server import FILE_MODE, LocalServer, free_port, private_dir
from medseg.core.errors import MedsegError
from medseg.core.settings import StorageSettings, env_file_path
from medseg.core.storage import Storage

__all__ = [
    "FILE_MODE",
    "MinioServer",
    "find_minio_binary",
    "free_port",
    "private_dir",
    "read_env_file",
    "start_and_export",
    "start_local",
    "write_env_file",
]


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


def find_minio_binary() -> Path:
    """Locate the ``minio`` server binary.

    Raises:
        MedsegError: If it is nowhere to be found (the set-up step builds it).
    """
    candidates = [os.environ.get("MEDSEG_MINIO_BIN")]
    here = Path(__file__).resolve().parents[2] / ".tools" / "bin" / "minio"
    candidates += [str(Path.cwd() / ".tools" / "bin" / "minio"), str(here), shutil.which("minio")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise MedsegError(
        "MinIO server binary not found: run `make setup` (it builds .tools/bin/minio), "
        "or set MEDSEG_MINIO_BIN"
    )


class MinioServer(LocalServer):
    """A MinIO server process bound to 127.0.0.1.

    Args:
        data_dir: Folder the server stores objects in.
        port: API port; a free one when omitted. Kept across :meth:`stop`/:meth:`start`.
        access_key: Root user; generated when omitted.
        secret_key: Root password; generated when omitted.
        binary: Server binary; found by :func:`find_minio_binary` when omitted.
    """

    name = "MinIO"

    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        binary: str | Path | None = None,
    ):
        self.data_dir = Path(data_dir)
        super().__init__(port, self.data_dir.parent)
        self.console_port = free_port()
        self.access_key = access_key or f"medseg-{secrets.token_hex(4)}"
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.binary = Path(binary) if binary else find_minio_binary()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return self.url

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

    def argv(self) -> list[str]:
        return [
            str(self.binary),
            "server",
            str(self.data_dir),
            "--address",
            f"127.0.0.1:{self.port}",
            "--console-address",
            f"127.0.0.1:{self.console_port}",
            "--quiet",
        ]

    def environment(self) -> dict[str, str]:
        return {
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_CI_CD": "1",
        }

    def ready_path(self) -> str:
        return "/minio/health/ready"

    def prepare(self) -> None:
        private_dir(self.data_dir)

    def exit_reason(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        fatal = [x.strip() for x in lines if "FATAL" in x or "ERROR" in x] or lines[-1:]
        return " ".join(fatal)[-500:]


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

    The env file goes where every medseg command reads it
    (:func:`medseg.core.settings.env_file_path`) and the server's endpoint and credentials go into
    this process's environment.
    """
    server = start_local(data_dir, port, bucket, env_file_path())
    os.environ.update(server.env())
    return server
