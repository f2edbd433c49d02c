"""Run a real MLflow tracking server on loopback: for tests, the demo and local use.

The server is ``python -m mlflow server`` of this interpreter (the ``tracking`` extra), bound to
127.0.0.1 on a free port. Runs, metrics and registered models go to a SQLite database (by
default ``.medseg/mlflow.db``); artifacts go to the platform's bucket under ``mlflow/``, written
and served by the server itself (``--serve-artifacts``), so that clients need the tracking URI
only, never S3 credentials. The server reads the object store's endpoint and keys from its
environment (``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), never
from its command line, where any user could read them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from medseg.errors import MedsegError
from medseg.minio_server import (
    FILE_MODE,
    _die_with_parent,
    _pdeathsig_applies,
    free_port,
    private_dir,
)
from medseg.settings import StorageSettings

__all__ = ["DEFAULT_DB", "DEFAULT_PORT", "MlflowServer", "start_and_export"]

#: The tracking database when nothing else is said.
DEFAULT_DB = Path(".medseg") / "mlflow.db"
#: ``medseg mlflow``'s port when nothing else is said (MLflow's own default).
DEFAULT_PORT = 5000
#: The folder of the bucket that holds MLflow's artifacts.
ARTIFACTS_FOLDER = "mlflow"


def _server_env(storage: StorageSettings) -> dict[str, str]:
    """What the server needs to write the bucket: boto3's names, from the storage settings."""
    env = {"MLFLOW_S3_ENDPOINT_URL": storage.display_endpoint()}
    if storage.access_key is not None:
        env["AWS_ACCESS_KEY_ID"] = storage.access_key.get_secret_value()
    if storage.secret_key is not None:
        env["AWS_SECRET_ACCESS_KEY"] = storage.secret_key.get_secret_value()
    env["AWS_DEFAULT_REGION"] = storage.region or "us-east-1"
    return env


class MlflowServer:
    """An MLflow tracking server process bound to 127.0.0.1.

    Args:
        bucket: The platform's bucket; artifacts go to ``s3://BUCKET/mlflow``.
        storage: How the server reaches the object store (its environment, not its argv).
        db: The SQLite database of runs and registered models (created owner-only).
        port: Port; a free one when omitted. Kept across :meth:`stop`/:meth:`start`.
    """

    def __init__(
        self,
        bucket: str,
        storage: StorageSettings,
        db: str | Path = DEFAULT_DB,
        port: int | None = None,
    ):
        self.bucket = bucket
        self.storage = storage
        self.db = Path(db).resolve()
        self.port = port or free_port()
        self.log_path = self.db.parent / f"mlflow-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """The tracking URI, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts(self) -> str:
        """Where the server keeps artifacts: ``s3://BUCKET/mlflow``."""
        return f"s3://{self.bucket}/{ARTIFACTS_FOLDER}"

    def argv(self) -> list[str]:
        """The server's command line (no credential on it)."""
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.db}",
            "--artifacts-destination",
            self.artifacts,
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def start(self, timeout: float = 300.0) -> MlflowServer:
        """Start the server and wait until ``/health`` answers.

        Raises:
            MedsegError: If it exits or is not ready within ``timeout`` seconds (a loaded
                machine takes tens of seconds to import MLflow and migrate a new database).
        """
        private_dir(self.db.parent)
        env = {**os.environ, **_server_env(self.storage)}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = os.fdopen(
            os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE), "ab"
        )
        self._proc = subprocess.Popen(
            self.argv(),
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
                tail = self.log_path.read_text(errors="replace")[-800:]
                raise MedsegError(
                    f"MLflow on 127.0.0.1:{self.port} exited with code {self._proc.returncode} "
                    f"(log {self.log_path}):\n{tail}"
                )
            if self.is_ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise MedsegError(f"MLflow on {self.uri} not ready after {timeout:.0f}s")

    def is_ready(self) -> bool:
        """Whether the server answers ``/health``."""
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return None if self._proc is None else self._proc.pid

    def run_until(self, stop: Callable[[], bool], poll: float = 0.5) -> None:
        """Keep the server until ``stop()`` is true; then stop it.

        Raises:
            MedsegError: If the server exits by itself meanwhile.
        """
        try:
            while not stop():
                if self._proc is not None and self._proc.poll() is not None:
                    tail = self.log_path.read_text(errors="replace")[-1000:]
                    raise MedsegError(
                        f"MLflow on {self.uri} exited with code {self._proc.returncode} "
                        f"(log {self.log_path}):\n{tail}"
                    )
                time.sleep(poll)
        finally:
            self.stop()

    def _signal_group(self, sig: int) -> None:
        """Signal the server's process group: ``mlflow server`` runs uvicorn as its child."""
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def stop(self) -> None:
        """Stop the server and its workers (runs stay in the database, artifacts in the bucket)."""
        if self._proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self._proc.wait()
        self._signal_group(signal.SIGKILL)  # a worker that outlived its parent
        self._proc = None

    def kill(self) -> None:
        """Kill the server and its workers abruptly (SIGKILL), as a crashed pod would go."""
        if self._proc is not None:
            self._signal_group(signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_and_export(bucket: str, db: Path = DEFAULT_DB, port: int | None = None) -> MlflowServer:
    """Start a server on the object store of this process's settings; export its URI.

    ``MLFLOW_TRACKING_URI`` goes into this process's environment, so that what it starts
    (training, evaluation, registration) tracks there.
    """
    server = MlflowServer(bucket, StorageSettings.from_env(), db, port).start()
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    return server
