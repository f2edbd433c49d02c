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

import os
import sys
from pathlib import Path

from medseg.apps.local_server import LocalServer
from medseg.core.settings import StorageSettings

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


class MlflowServer(LocalServer):
    """An MLflow tracking server process bound to 127.0.0.1.

    Args:
        bucket: The platform's bucket; artifacts go to ``s3://BUCKET/mlflow``.
        storage: How the server reaches the object store (its environment, not its argv).
        db: The SQLite database of runs and registered models (created owner-only).
        port: Port; a free one when omitted. Kept across :meth:`stop`/:meth:`start`.
    """

    name = "MLflow"
    poll = 0.25

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
        super().__init__(port, self.db.parent)

    @property
    def uri(self) -> str:
        """The tracking URI, ``http://127.0.0.1:PORT``."""
        return self.url

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

    #: A client's setting, not the server's.
    unset_env = ("MLFLOW_TRACKING_URI",)

    def environment(self) -> dict[str, str]:
        return _server_env(self.storage)

    def ready_path(self) -> str:
        return "/health"

    def start(self, timeout: float = 300.0) -> MlflowServer:
        """Start the server and wait until ``/health`` answers.

        A loaded machine takes tens of seconds to import MLflow and migrate a new database.
        """
        return super().start(timeout)


def start_and_export(bucket: str, db: Path = DEFAULT_DB, port: int | None = None) -> MlflowServer:
    """Start a server on the object store of this process's settings; export its URI.

    ``MLFLOW_TRACKING_URI`` goes into this process's environment, so that what it starts
    (training, evaluation, registration) tracks there.
    """
    server = MlflowServer(bucket, StorageSettings.from_env(), db, port).start()
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    return server
