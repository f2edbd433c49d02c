"""Operational settings, from the environment: one tree, :class:`PlatformSettings`.

Its branches: the platform's store (``MEDSEG_STORE``), the container images and the ports
(``MEDSEG_IMAGES__PROJECT``, ``MEDSEG_PORTS__HTTP``, …: pydantic-settings' nested names), the
object-store connection (:class:`StorageSettings`) and the model server's limits
(:class:`ServerLimits`). Every default is defined here once; the Helm chart's ``values.yaml``
is checked against them by a test (tests/unit/core/test_settings.py).

The names are the ones KServe, the AWS CLI and MinIO SDK users already know:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL``),
``S3_USE_HTTPS`` and ``AWS_REGION``. For local use, ``medseg minio`` writes them to an env file
(``.medseg/minio.env``, or the path in ``MEDSEG_ENV_FILE``) that is read as a fallback; real
environment variables always win. Secrets are :class:`pydantic.SecretStr` so they never print.

:class:`ServerLimits` holds every limit the model server enforces on what a client sends
(``MEDSEG_SERVER_*`` variables, or the ``medseg serve`` / ``python -m model_server`` flags).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The platform's store (datasets, runs, models) when nothing else is said: the default bucket.
DEFAULT_BUCKET = "medseg"
DEFAULT_STORE = f"s3://{DEFAULT_BUCKET}"
#: The registry's (and the InferenceService's) model name when nothing else is said.
DEFAULT_MODEL_NAME = "brats-segresnet"
#: The model's name on a local model server when nothing else is said.
DEFAULT_SERVED_NAME = "medseg"
#: Where KServe's storage initializer puts the model in the predictor's pod (``--model_dir``).
KSERVE_MODEL_DIR = "/mnt/models"
#: Default env file written by ``medseg minio`` and read by every other command.
DEFAULT_ENV_FILE = Path(".medseg") / "minio.env"


def env_file_path() -> Path:
    """Where the local env file is (``MEDSEG_ENV_FILE`` overrides the default)."""
    return Path(os.environ.get("MEDSEG_ENV_FILE", str(DEFAULT_ENV_FILE)))


class StorageSettings(BaseSettings):
    """How to reach the S3-compatible object store.

    Attributes:
        access_key: ``AWS_ACCESS_KEY_ID``.
        secret_key: ``AWS_SECRET_ACCESS_KEY``.
        endpoint: ``S3_ENDPOINT`` or ``AWS_ENDPOINT_URL``; ``host:port`` or a URL.
        use_https: ``S3_USE_HTTPS`` ("0"/"1"); defaults to the URL scheme, else HTTPS.
        region: ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.
        retry_seconds: How long an operation keeps retrying connection errors.
        part_size: Multipart part size in bytes for uploads.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    access_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID", "access_key")
    )
    secret_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY", "secret_key")
    )
    endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("S3_ENDPOINT", "AWS_ENDPOINT_URL", "endpoint")
    )
    use_https: bool | None = Field(
        default=None, validation_alias=AliasChoices("S3_USE_HTTPS", "use_https")
    )
    region: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION", "region")
    )
    retry_seconds: float = Field(
        default=30.0,
        ge=0,
        validation_alias=AliasChoices("MEDSEG_S3_RETRY_SECONDS", "retry_seconds"),
    )
    part_size: int = Field(
        default=16 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        validation_alias=AliasChoices("MEDSEG_S3_PART_SIZE", "part_size"),
    )

    @classmethod
    def from_env(cls) -> StorageSettings:
        """Read the environment, falling back to the local env file when it exists."""
        path = env_file_path()
        if path.is_file():
            return cls(_env_file=path)  # type: ignore[call-arg]
        return cls()

    def host_and_secure(self) -> tuple[str, bool]:
        """Split the endpoint into ``host:port`` and whether to use TLS.

        Raises:
            ValueError: If no endpoint is configured.
        """
        if not self.endpoint:
            raise ValueError(
                "no S3 endpoint configured: set S3_ENDPOINT (or AWS_ENDPOINT_URL), "
                "or start a local server with `medseg minio`"
            )
        if "://" in self.endpoint:
            parsed = urlparse(self.endpoint)
            secure = parsed.scheme == "https" if self.use_https is None else self.use_https
            return parsed.netloc, secure
        return self.endpoint, True if self.use_https is None else self.use_https

    def display_endpoint(self) -> str:
        """The endpoint as it may appear in messages (never a credential)."""
        try:
            host, secure = self.host_and_secure()
        except ValueError:
            return "<no endpoint>"
        return f"{'https' if secure else 'http'}://{host}"


_MIB = 1024 * 1024
#: Seconds of the grace period kept for what follows the drain: cancelling what did not finish,
#: stopping gRPC, unloading the model and leaving the interpreter.
SHUTDOWN_MARGIN_S = 5


class ServerLimits(BaseSettings):
    """What the model server accepts, and how much of it at once (``MEDSEG_SERVER_<NAME>``).

    Every refusal names the limit it hit by its field name here, so that an operator knows
    which variable to raise.

    Attributes:
        host: Interface both REST and gRPC bind; loopback unless told otherwise (the server
            image sets ``0.0.0.0`` for the cluster).
        max_request_mb: Largest request body (REST) or message (gRPC), MiB.
        max_inflight_mb: Request bytes a replica holds at once, over all requests (declared
            Content-Length counts before it arrives); beyond it: 503 with Retry-After.
        max_connections: REST requests served at once (beyond it: 503 with Retry-After, counted);
            the gRPC server takes ``max_inflight_mb // max_request_mb`` calls at once.
        max_concurrency: Cases decoded and segmented at once; the rest wait their turn.
        body_timeout_s: Longest time for a whole request body to arrive (408 after it).
        body_idle_s: Longest pause between two parts of a body (408 after it).
        request_timeout_s: Longest time a request may wait and compute; later, its work is
            cancelled between stages (504).
        max_case_voxels: Voxels of one case as sent, all channels together (checked on the
            NIfTI header or tensor shape, before any voxel is read).
        max_resampled_voxels: Voxels of one case after resampling to the model's spacing.
        max_edge: Largest edge of a volume, in voxels.
        min_spacing_mm: Smallest voxel spacing accepted.
        max_spacing_mm: Largest voxel spacing accepted.
        max_position_mm: Farthest a voxel of a case may lie from the scanner's origin, on any
            axis (mm); a grid beyond it cannot be placed (100 m by default: scanners place
            patients within a metre or two).
        max_image_pixels: Pixels of one 2D image (JPEG/PNG) as its header announces them,
            checked before any pixel is decoded (40 MP: a dermatoscope's full frame).
        max_image_edge: Largest width or height of a 2D image, in pixels.
        max_param_chars: Longest request id, parameter name or string parameter value.
        max_json_values: Values (numbers, strings, …) in a request's JSON part; tensors of a
            real size travel as binary data.
        retry_after_s: The Retry-After of a 503.
        malloc_arenas: glibc malloc arenas the server may use (``mallopt(M_ARENA_MAX)``).
            Without a bound each worker thread gets an arena of its own, memory freed by one
            request is not reused by the next one on another thread, and the RSS creeps up
            by a working set per thread.
        grace_period_s: Seconds between SIGTERM and the kill (the predictor pod's
            ``terminationGracePeriodSeconds``, rendered from this one value). On SIGTERM the
            server refuses new requests and lets those in flight finish for :attr:`drain_s`,
            then exits.
    """

    model_config = SettingsConfigDict(env_prefix="MEDSEG_SERVER_", extra="ignore")

    host: str = "127.0.0.1"
    max_request_mb: int = Field(default=256, ge=1)
    max_inflight_mb: int = Field(default=512, ge=1)
    max_connections: int = Field(default=64, ge=2)
    max_concurrency: int = Field(default=1, ge=1)
    body_timeout_s: float = Field(default=120.0, gt=0)
    body_idle_s: float = Field(default=30.0, gt=0)
    request_timeout_s: float = Field(default=900.0, gt=0)
    max_case_voxels: int = Field(default=256 * 256 * 160 * 4, ge=1)
    max_resampled_voxels: int = Field(default=256 * 256 * 160 * 4, ge=1)
    max_edge: int = Field(default=512, ge=1)
    min_spacing_mm: float = Field(default=0.05, gt=0)
    max_spacing_mm: float = Field(default=50.0, gt=0)
    max_position_mm: float = Field(default=1e5, gt=0)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_image_edge: int = Field(default=16_384, ge=1)
    max_param_chars: int = Field(default=1024, ge=64)
    max_json_values: int = Field(default=2_000_000, ge=1)
    retry_after_s: int = Field(default=5, ge=1)
    malloc_arenas: int = Field(default=2, ge=1)
    grace_period_s: int = Field(default=60, ge=2 * SHUTDOWN_MARGIN_S)

    @model_validator(mode="after")
    def _consistent(self) -> ServerLimits:
        if self.max_inflight_mb < self.max_request_mb:
            raise ValueError(
                f"max_inflight_mb ({self.max_inflight_mb}) must be at least max_request_mb "
                f"({self.max_request_mb}): one full request must fit"
            )
        if self.min_spacing_mm >= self.max_spacing_mm:
            raise ValueError("min_spacing_mm must be below max_spacing_mm")
        return self

    @property
    def max_request_bytes(self) -> int:
        """:attr:`max_request_mb` in bytes."""
        return self.max_request_mb * _MIB

    @property
    def max_inflight_bytes(self) -> int:
        """:attr:`max_inflight_mb` in bytes."""
        return self.max_inflight_mb * _MIB

    @property
    def max_decoded_bytes(self) -> int:
        """Most bytes that decompressing one request may produce.

        The voxels of the largest case at 8 bytes a voxel (float64, the widest type accepted),
        plus the request limit for the headers and extensions of its files.
        """
        return self.max_case_voxels * 8 + self.max_request_bytes

    @property
    def drain_s(self) -> int:
        """Seconds in-flight requests may take to finish after SIGTERM.

        The grace period but :data:`SHUTDOWN_MARGIN_S`, so that the server exits before it is
        killed.
        """
        return self.grace_period_s - SHUTDOWN_MARGIN_S

    @property
    def grpc_concurrent_calls(self) -> int:
        """Calls the gRPC server takes at once: the full-size messages the budget holds."""
        return max(1, self.max_inflight_mb // self.max_request_mb)


class DeidSettings(BaseSettings):
    """The de-identification secret (see :mod:`medseg.dicom.deid`), from the environment only.

    Attributes:
        key: ``MEDSEG_DEID_KEY``: UIDs, pseudonyms and date shifts derive from it. Keep it in a
            Secret; whoever holds it can link de-identified studies to their sources.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("MEDSEG_DEID_KEY", "key")
    )


class TrainTelemetry(BaseSettings):
    """Where training reports its progress besides TensorBoard, from the environment.

    Attributes:
        metrics_textfile: ``MEDSEG_TRAIN_METRICS_TEXTFILE``: a Prometheus text-format file that
            rank 0 rewrites (atomically) after every optimiser step and epoch: step, loss,
            samples/s, epoch and validation Dice. Point node-exporter's textfile collector (or
            any sidecar that serves the file) at it; unset, no file is written.
    """

    model_config = SettingsConfigDict(env_prefix="MEDSEG_TRAIN_", extra="ignore")

    metrics_textfile: Path | None = None


class TaskSettings(BaseSettings):
    """Task families from outside medseg (see :mod:`medseg.tasks`), from the environment.

    Attributes:
        plugins: ``MEDSEG_TASK_PLUGINS``: comma-separated ``module:attribute`` references to
            :class:`~medseg.tasks.Task` objects, imported and registered the first time a task
            or label convention is looked up and not found. Every process that meets such a
            model needs it: the model server, a training pod, a preprocessing worker.
    """

    model_config = SettingsConfigDict(env_prefix="MEDSEG_TASK_", extra="ignore")

    plugins: str = ""

    def references(self) -> list[str]:
        """The ``module:attribute`` references, in order."""
        return [r.strip() for r in self.plugins.split(",") if r.strip()]


class TrackingSettings(BaseSettings):
    """Experiment tracking on MLflow (:mod:`medseg.registry.tracking`), from the environment.

    Without a tracking URI nothing is tracked and nothing else changes.

    Attributes:
        uri: ``MLFLOW_TRACKING_URI``: the MLflow server (``http://HOST:PORT``), the name every
            MLflow client knows; ``medseg mlflow`` starts one on 127.0.0.1.
        experiment: ``MEDSEG_TRACKING_EXPERIMENT``: the MLflow experiment of training runs.
        buffer: ``MEDSEG_TRACKING_BUFFER``: metric values a trainer holds for a server that
            does not answer; beyond it the oldest are dropped (and counted in the warning).
        flush_s: ``MEDSEG_TRACKING_FLUSH_S``: how long a finishing run waits for what is still
            buffered to reach the server before it reports it lost.
        timeout_s: ``MEDSEG_TRACKING_TIMEOUT_S``: the HTTP timeout of one MLflow request.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "uri")
    )
    experiment: str = Field(
        default="medseg", validation_alias=AliasChoices("MEDSEG_TRACKING_EXPERIMENT", "experiment")
    )
    buffer: int = Field(
        default=100_000, ge=1, validation_alias=AliasChoices("MEDSEG_TRACKING_BUFFER", "buffer")
    )
    flush_s: float = Field(
        default=30.0, ge=0, validation_alias=AliasChoices("MEDSEG_TRACKING_FLUSH_S", "flush_s")
    )
    timeout_s: float = Field(
        default=10.0, gt=0, validation_alias=AliasChoices("MEDSEG_TRACKING_TIMEOUT_S", "timeout_s")
    )


class Images(BaseModel):
    """The container images, pinned (the chart's ``image`` and ``serverImage``).

    Attributes:
        project: Components and training (kfp, medseg, torch): pipeline steps, PyTorchJobs.
        server: The model server (kserve ModelServer and the medseg predictor).
    """

    project: str = "ghcr.io/medseg/medseg:0.1.0"
    server: str = "ghcr.io/medseg/medseg-server:0.1.0"


class Ports(BaseModel):
    """The ports the platform's servers listen on.

    Attributes:
        http: The model server's REST port (kserve's ``--http_port``).
        grpc: The model server's gRPC port (kserve's ``--grpc_port``).
        minio: A local MinIO's API port (``medseg minio``).
    """

    http: int = Field(default=8080, ge=0, le=65535)
    grpc: int = Field(default=8081, ge=0, le=65535)
    minio: int = Field(default=9000, ge=0, le=65535)


class Placement(BaseModel):
    """Where one workload's pods run: the scheduling fields of its pod spec, and pull secrets.

    The names and shapes are Kubernetes' own (camelCase, as in the chart's ``values.yaml``, where
    every workload's section carries these keys); ``values.schema.json``'s ``placement``
    definition lists the same keys (``tests/unit/core/test_settings.py``). The chart hands each
    block that medseg's code builds pods for (PyTorchJob pods, the predictor, the pipeline's steps)
    to the Python side as JSON in its ConfigMap (``MEDSEG_PLACEMENT__<WORKLOAD>``,
    :class:`PlacementSettings`).

    Attributes:
        node_selector: ``nodeSelector``: labels a node must carry (e.g. a GPU pool's label).
        tolerations: ``tolerations``: ``V1Toleration`` objects (e.g. of a GPU pool's taint).
        affinity: ``affinity``: a ``V1Affinity`` object (node, pod and pod anti-affinity).
        priority_class_name: ``priorityClassName`` (empty: the cluster's default).
        topology_spread_constraints: ``topologySpreadConstraints``: ``V1TopologySpreadConstraint``
            objects, added to any the workload has of its own.
        image_pull_secrets: ``imagePullSecrets`` by name: the chart's global list and the
            workload image's own, merged.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
    )

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    priority_class_name: str = ""
    topology_spread_constraints: list[dict[str, Any]] = Field(default_factory=list)
    image_pull_secrets: list[str] = Field(default_factory=list)

    def api_fields(self) -> dict[str, Any]:
        """The non-empty fields as Kubernetes names them (camelCase), for a pod spec."""
        return self.model_dump(by_alias=True, exclude_defaults=True)


class PlacementSettings(BaseSettings):
    """The placement of each workload medseg's code creates pods for (``MEDSEG_PLACEMENT__*``).

    Each variable holds one :class:`Placement` as JSON; the chart's ConfigMap carries them, and
    the pipeline maps them into the steps that need them (the chart's ``training``,
    ``inferenceService`` and ``pipeline.steps`` values). Unset: no constraint.

    Attributes:
        training: ``MEDSEG_PLACEMENT__TRAINING``: PyTorchJob master and worker pods, and the
            pipeline's train step (with launcher ``local`` it trains in place).
        predictor: ``MEDSEG_PLACEMENT__PREDICTOR``: the InferenceService's predictor pods.
        steps: ``MEDSEG_PLACEMENT__STEPS``: every other pipeline step. KFP sets a step's
            ``nodeSelector``, ``tolerations``, node affinity and pull secrets only, so this block
            refuses pod (anti-)affinity, a priority class and topology spread.
        train_step_gpus: ``MEDSEG_PLACEMENT__TRAIN_STEP_GPUS``: GPUs of the pipeline's train
            step (an ``nvidia.com/gpu`` accelerator limit), for launcher ``local``; PyTorchJob
            pods take the ``training`` group's ``gpus_per_worker``.
    """

    model_config = SettingsConfigDict(env_prefix="MEDSEG_PLACEMENT__", extra="ignore")

    training: Placement = Field(default_factory=Placement)
    predictor: Placement = Field(default_factory=Placement)
    steps: Placement = Field(default_factory=Placement)
    train_step_gpus: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _steps_as_kfp_sets_them(self) -> PlacementSettings:
        # A GPU train step takes only these fields of ``training``; the PyTorchJob pods get all.
        fields = self.steps.api_fields()
        unsupported: list[str] = [
            k for k in ("priorityClassName", "topologySpreadConstraints") if k in fields
        ]
        unsupported += [f"affinity.{key}" for key in self.steps.affinity if key != "nodeAffinity"]
        if unsupported:
            raise ValueError(
                f"placement.steps: KFP cannot set {', '.join(unsupported)} on a pipeline step "
                "(kfp-kubernetes sets nodeSelector, tolerations, nodeAffinity and imagePullSecrets)"
            )
        return self


#: The defaults, for signatures and command-line options (the environment is not read).
DEFAULT_IMAGES = Images()
DEFAULT_PORTS = Ports()


class PlatformSettings(BaseSettings):
    """The one tree of operational settings (``MEDSEG_<FIELD>``, nested with ``__``).

    Attributes:
        store: ``MEDSEG_STORE``: the platform's store, ``s3://BUCKET`` or a folder.
        images: ``MEDSEG_IMAGES__PROJECT``, ``MEDSEG_IMAGES__SERVER``.
        ports: ``MEDSEG_PORTS__HTTP``, ``MEDSEG_PORTS__GRPC``, ``MEDSEG_PORTS__MINIO``.
        storage: The object-store connection (its own names: ``S3_ENDPOINT``, …).
        server: The model server's limits (``MEDSEG_SERVER_*``).
        placement: Where each workload's pods run (``MEDSEG_PLACEMENT__*``).
        tracking: Experiment tracking (``MLFLOW_TRACKING_URI``, ``MEDSEG_TRACKING_*``).
        task: Task families from outside medseg (``MEDSEG_TASK_PLUGINS``).
    """

    model_config = SettingsConfigDict(
        env_prefix="MEDSEG_", env_nested_delimiter="__", extra="ignore"
    )

    store: str = DEFAULT_STORE
    images: Images = Field(default_factory=Images)
    ports: Ports = Field(default_factory=Ports)
    storage: StorageSettings = Field(default_factory=StorageSettings.from_env)
    server: ServerLimits = Field(default_factory=ServerLimits)
    placement: PlacementSettings = Field(default_factory=PlacementSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    task: TaskSettings = Field(default_factory=TaskSettings)

    @property
    def bucket(self) -> str | None:
        """The store's bucket (None for a folder)."""
        if not self.store.startswith("s3://"):
            return None
        return self.store.removeprefix("s3://").split("/", 1)[0]


@dataclass(frozen=True)
class ServerArgs:
    """The model server's command line (``python -m model_server`` / ``medseg serve``), built once.

    The flags are those of :func:`model_server.server.parse_args`; a limit left None comes from
    the server's environment (:class:`ServerLimits`).

    Attributes:
        model_dir: Folder or ``s3://`` prefix with ``model.yaml`` and ``model.pt``.
        model_name: The model's name in the URL.
        http_port, grpc_port: Ports.
        host: Interface both bind (default: ``MEDSEG_SERVER_HOST``, else loopback).
        max_request_mb: Largest request, MiB.
        max_concurrency: Cases segmented at once.
    """

    model_dir: str
    model_name: str = DEFAULT_SERVED_NAME
    http_port: int = DEFAULT_PORTS.http
    grpc_port: int = DEFAULT_PORTS.grpc
    host: str | None = None
    max_request_mb: int | None = None
    max_concurrency: int | None = None

    def argv(self) -> list[str]:
        """The flags, as the server parses them."""
        argv = ["--model_dir", self.model_dir, "--model_name", self.model_name]
        argv += ["--http_port", str(self.http_port), "--grpc_port", str(self.grpc_port)]
        for flag, value in (
            ("--host", self.host),
            ("--max_request_mb", self.max_request_mb),
            ("--max_concurrency", self.max_concurrency),
        ):
            if value is not None:
                argv += [flag, str(value)]
        return argv

    def command(self) -> list[str]:
        """The whole command: this interpreter running ``model_server`` with :meth:`argv`."""
        return [sys.executable, "-m", "model_server", *self.argv()]
