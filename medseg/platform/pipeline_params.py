"""The pipeline's parameters, in three typed groups, and the references its steps hand over.

**Parameter groups.** The pipeline takes a few plain parameters (the source, the store, the config)
and three groups, each a KFP ``dict`` parameter defined once here as a pydantic model:
:class:`TrainingParams` (how and where training runs), :class:`ClusterParams` (the Helm release the
run works in: namespace, ServiceAccounts, the S3 Secret and ConfigMap) and :class:`DeploymentParams`
(the InferenceService). Their defaults come from the single definitions
(:mod:`medseg.core.settings`, :data:`medseg.platform.kube.DEFAULT_RELEASE`,
:class:`medseg.platform.deploy.InferenceServiceSpec`); every component validates the group it reads
with :func:`parse_group`, whose error names the field (``training.workers: …``). On the command line
``--param GROUP.FIELD=VALUE`` sets one field (:func:`pipeline_arguments`).

**Artifact references.** Volumes stay in the object store; a step hands the next one a typed
KFP artifact (``Dataset``, ``Model``, …) whose file holds a JSON reference to what it wrote,
naming its content: a dataset version with its manifest's content hash, a model with its
weights' sha256. The artifact's metadata says the same (the KFP UI shows it).
:func:`write_ref` and :func:`read_ref` are the one way every component writes and reads them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medseg.config import MedsegConfig
from medseg.core.errors import MedsegError
from medseg.core.settings import PlatformSettings
from medseg.core.storage import Storage
from medseg.platform.deploy import InferenceServiceSpec
from medseg.platform.kube import DEFAULT_RELEASE, Release
from medseg.platform.launchers import (
    DEFAULT_POD_CPU,
    DEFAULT_POD_MEMORY,
    LAUNCHERS,
    Launcher,
    S3Secret,
    TrainTarget,
)
from medseg.tasks import known_tasks

__all__ = [
    "GROUPS",
    "ClusterParams",
    "DatasetArtifact",
    "DeploymentParams",
    "EvaluationArtifact",
    "ModelArtifact",
    "PipelineRef",
    "PredictionsArtifact",
    "PreprocessedArtifact",
    "TrainingParams",
    "check_preprocessed",
    "object_digest",
    "parse_group",
    "pipeline_arguments",
    "read_ref",
    "write_ref",
]

#: The InferenceService's defaults (replicas, scaling), the deployment group's.
_SPEC_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(InferenceServiceSpec)
}


#: A Kubernetes resource quantity as pods take them (``2``, ``500m``, ``8Gi``, ``1.5``).
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|[kMGTPE]i?|Ki)?$"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingParams(_Group):
    """How and where the model trains.

    Attributes:
        epochs: Overrides the config's ``train.epochs`` when above 0.
        launcher: ``local`` (torchrun in the step) or ``pytorchjob``.
        workers: torchrun processes (local) or PyTorchJob pods.
        gpus_per_worker: GPUs per PyTorchJob pod (one process each).
        image: The project image, for the PyTorchJob pods.
        timeout: Seconds to wait for the PyTorchJob.
        cpu, memory: What each PyTorchJob pod requests and is limited to (Kubernetes
            quantities, e.g. ``500m``, ``4Gi``).
    """

    epochs: int = Field(default=0, ge=0)
    launcher: Literal[LAUNCHERS] = "local"  # type: ignore[valid-type]
    workers: int = Field(default=2, ge=1)
    gpus_per_worker: int = Field(default=0, ge=0)
    image: str = Field(default_factory=lambda: PlatformSettings().images.project, min_length=1)
    timeout: int = Field(default=86400, gt=0)
    cpu: str = Field(default=DEFAULT_POD_CPU, pattern=_QUANTITY)
    memory: str = Field(default=DEFAULT_POD_MEMORY, pattern=_QUANTITY)

    def target(self) -> TrainTarget:
        """The launch parameters as the launchers take them."""
        return TrainTarget(self.launcher, self.workers, self.gpus_per_worker, self.cpu, self.memory)

    def launcher_in(self, cluster: ClusterParams) -> Launcher:
        """The launcher of this group; a PyTorchJob runs in ``cluster``'s release.

        It runs in the release's namespace as its pipeline ServiceAccount, with its S3 Secret
        and ConfigMap (those of :meth:`ClusterParams.resolved`).
        """
        names = cluster.resolved()
        return self.target().launcher_for(
            self.image,
            names.namespace,
            names.names.pipeline_service_account,
            S3Secret(name=names.s3_secret, config=names.s3_config),
            self.timeout,
        )

    def configured(self, cfg: MedsegConfig) -> MedsegConfig:
        """``cfg`` with this group's ``epochs`` in ``train.epochs`` when above 0, else ``cfg``."""
        return cfg.with_epochs(self.epochs)


class ClusterParams(_Group):
    """The Helm release the run works in (its namespace, ServiceAccounts, Secret, ConfigMap).

    Attributes:
        namespace: The release's namespace: PyTorchJobs and InferenceServices go there.
        release: The Helm release name; the chart's object names derive from it.
        s3_secret: Secret with ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``; empty: the
            release's (``Release.s3_secret``), else an explicit one (``s3.existingSecret``).
        s3_config: ConfigMap with ``S3_ENDPOINT``/``S3_USE_HTTPS``; empty: the release's.
        fullname_override: The chart's ``fullnameOverride`` (or the FULLNAME a ``nameOverride``
            gives), when the release was installed with one; empty: derived from ``release``.
    """

    namespace: str = Field(default=DEFAULT_RELEASE.namespace, min_length=1)
    release: str = Field(default=DEFAULT_RELEASE.name, min_length=1)
    s3_secret: str = ""
    s3_config: str = ""
    fullname_override: str = ""

    @property
    def names(self) -> Release:
        """The chart's object names of this release."""
        return Release(self.release, self.namespace, fullname_override=self.fullname_override)

    def resolved(self) -> ClusterParams:
        """This group with the Secret and ConfigMap names filled in from the release."""
        return self.model_copy(
            update={
                "s3_secret": self.s3_secret or self.names.s3_secret,
                "s3_config": self.s3_config or self.names.s3_config,
            }
        )


class DeploymentParams(_Group):
    """Where and how the registered model is served.

    Attributes:
        target: ``local`` (record the ``medseg serve`` command) or ``kserve``.
        image: The model server image, for the predictor.
        mode: KServe deployment mode, ``Knative`` or ``Standard``.
        min_replicas: Fewest predictor replicas (0 scales to zero with Knative).
        max_replicas: Most predictor replicas.
        scale_metric: ``concurrency`` or ``rps`` (Knative), ``cpu`` or ``memory`` (Standard).
        scale_target: Target of the scale metric per replica.
        timeout: Seconds to wait for the InferenceService to be Ready.
        cpu, memory: Requests per replica (Kubernetes quantities); the HPA's CPU target is a
            percentage of ``cpu``.
        cpu_limit: CPU limit per replica (``None``: the request).
    """

    target: Literal["local", "kserve"] = "local"
    image: str = Field(default_factory=lambda: PlatformSettings().images.server, min_length=1)
    mode: Literal["Knative", "Standard"] = _SPEC_DEFAULTS["deployment_mode"]
    min_replicas: int = Field(default=_SPEC_DEFAULTS["min_replicas"], ge=0)
    max_replicas: int = Field(default=_SPEC_DEFAULTS["max_replicas"], ge=1)
    scale_metric: str = _SPEC_DEFAULTS["scale_metric"]
    scale_target: int = Field(default=_SPEC_DEFAULTS["scale_target"], ge=1)
    timeout: int = Field(default=900, gt=0)
    cpu: str = Field(default=_SPEC_DEFAULTS["cpu"], pattern=_QUANTITY)
    memory: str = Field(default=_SPEC_DEFAULTS["memory"], pattern=_QUANTITY)
    cpu_limit: str | None = Field(default=_SPEC_DEFAULTS["cpu_limit"], pattern=_QUANTITY)

    @model_validator(mode="after")
    def _valid_service(self) -> DeploymentParams:
        # The InferenceService's own rules (metric per mode, replica bounds), checked now.
        InferenceServiceSpec(
            name="check",
            storage_uri="s3://check/model",
            deployment_mode=self.mode,
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            scale_metric=self.scale_metric,
            scale_target=self.scale_target,
        )
        return self


#: The pipeline's parameter groups by name.
GROUPS: dict[str, type[_Group]] = {
    "training": TrainingParams,
    "cluster": ClusterParams,
    "deployment": DeploymentParams,
}
_G = TypeVar("_G", bound=_Group)


def _field_errors(exc: ValidationError, prefix: str) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join([prefix, *(str(x) for x in err["loc"])])
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_group(model: type[_G], value: Mapping[str, Any] | None, name: str) -> _G:
    """Validate one parameter group (a KFP ``dict`` parameter).

    KFP hands dict values over as JSON, so whole numbers may arrive as floats (``2.0``); they
    validate as ints.

    Raises:
        MedsegError: Naming the group's field and the reason (``training.workers: …``), also
            for an unknown field.
    """
    try:
        return model.model_validate(dict(value or {}))
    except ValidationError as exc:
        raise MedsegError(f"bad pipeline parameter {_field_errors(exc, name)}") from None
    except MedsegError as exc:  # a rule of the object the group describes
        raise MedsegError(f"bad pipeline parameter {name}: {exc}") from None


def parse_config(config_yaml: str, task: str = "") -> MedsegConfig:
    """The run's config from the pipeline's ``config_yaml`` (empty: the defaults) and ``task``.

    Args:
        config_yaml: The config as YAML.
        task: The pipeline's ``task`` parameter: a registered task's name; the config takes
            that task's defaults (empty: the config's own task, BraTS when it names none).

    Raises:
        MedsegError: If it is not YAML, not a valid config, or the config is of another task.
    """
    if task and task not in known_tasks():
        known = ", ".join(known_tasks())
        raise MedsegError(f"bad pipeline parameter task: {task!r} is not a task ({known})")
    return MedsegConfig.from_yaml(config_yaml, "bad pipeline parameter config_yaml", task)


def _scalar(value: str) -> int | float | str:
    """A plain parameter's value from the command line: an int, a float, else the string."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def pipeline_arguments(
    params: Mapping[str, Any], config: MedsegConfig | None = None, extra: Iterable[str] = ()
) -> dict[str, Any]:
    """The pipeline's arguments: ``params``, the config as YAML, then ``--param`` overrides.

    ``params`` may hold plain parameters and groups (``{"training": {"workers": 2}}``). A
    ``KEY=VALUE`` item sets a plain parameter, a ``GROUP.FIELD=VALUE`` item one field of a
    group (``training.epochs=2``, ``cluster.release=prod``). Every group is validated here and
    sent whole, with its defaults, so a bad value fails before the run starts.

    Raises:
        MedsegError: If an item is not ``KEY=VALUE``, names no group field, or a value is invalid.
    """
    args: dict[str, Any] = {k: v for k, v in params.items() if k not in GROUPS}
    groups = {name: dict(params.get(name) or {}) for name in GROUPS}
    if config is not None:
        args["config_yaml"] = config.to_yaml()
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise MedsegError(f"--param takes KEY=VALUE or GROUP.FIELD=VALUE, got {item!r}")
        group, dot, field = key.partition(".")
        if dot:
            if group not in GROUPS:
                known = ", ".join(GROUPS)
                raise MedsegError(f"--param {item!r}: no group {group!r} (groups: {known})")
            groups[group][field] = value  # validated (and converted) with the group below
        elif key in GROUPS:
            raise MedsegError(f"--param {item!r}: {key} is a group, set GROUP.FIELD=VALUE")
        else:
            args[key] = _scalar(value)
    if "config_yaml" in args:
        parse_config(args["config_yaml"])
    for name, model in GROUPS.items():
        args[name] = parse_group(model, groups[name], name).model_dump(mode="json")
    return args


class ArtifactFile(Protocol):
    """A KFP artifact as a component sees it (``dsl.Dataset``, ``dsl.Model``, …)."""

    name: str
    path: str
    metadata: dict[str, Any]


class PipelineRef(BaseModel):
    """A reference one step hands the next in a typed artifact: where the data is, what it is.

    Attributes:
        uri: Where the data lives in the object store.
        digest: What the data is: a content hash or sha256 of it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str] = "artifact"

    uri: str = Field(min_length=1)
    digest: str = Field(min_length=1)


class DatasetArtifact(PipelineRef):
    """A dataset version; ``digest`` is its manifest's content hash (also its version).

    Attributes:
        store: The store holding it.
        dataset: ``NAME@VERSION``.
        cases: Number of valid cases.
    """

    kind: ClassVar[str] = "dataset"
    store: str
    dataset: str
    cases: int = 0


class PreprocessedArtifact(PipelineRef):
    """A dataset's static preprocessing; ``digest`` is the data config's fingerprint.

    Attributes:
        dataset: ``NAME@VERSION`` it was computed from.
        cases: Number of preprocessed cases.
    """

    kind: ClassVar[str] = "preprocessed"
    dataset: str
    cases: int = 0


def check_preprocessed(
    prep: PreprocessedArtifact, data: DatasetArtifact, cfg: MedsegConfig
) -> None:
    """Check that ``prep`` is ``data`` preprocessed by ``cfg``'s data config.

    Raises:
        MedsegError: Naming both datasets and fingerprints when they differ.
    """
    if (prep.dataset, prep.digest) != (data.dataset, cfg.data.fingerprint()):
        raise MedsegError(
            f"preprocessed artifact {prep.dataset} ({prep.digest}) is not the dataset "
            f"{data.dataset} with this config's data fingerprint {cfg.data.fingerprint()}"
        )


class ModelArtifact(PipelineRef):
    """A model (a run's or a registered version); ``digest`` is ``model.pt``'s sha256.

    Attributes:
        run_id: The training run.
        dataset: ``NAME@VERSION`` it was trained on.
        version: The registry version (``v3``) when registered, else empty.
    """

    kind: ClassVar[str] = "model"
    run_id: str
    dataset: str
    version: str = ""


class PredictionsArtifact(PipelineRef):
    """A model's label maps of a dataset split; ``digest`` is ``predictions.json``'s sha256.

    Attributes:
        store: The store holding the dataset.
        dataset: ``NAME@VERSION``.
        split: The split predicted.
        cases: Number of cases written.
    """

    kind: ClassVar[str] = "predictions"
    store: str
    dataset: str
    split: str
    cases: int = 0


class EvaluationArtifact(PipelineRef):
    """An evaluation's output prefix; ``digest`` is its ``metrics.json``'s sha256.

    Attributes:
        passed: Whether the quality gate passed.
        metric: The task's gate metric (BraTS: ``dice_mean``; skin lesions: ``macro_auc``).
        value: Its validation value.
    """

    kind: ClassVar[str] = "evaluation"
    passed: bool
    metric: str
    value: float


_R = TypeVar("_R", bound=PipelineRef)


def object_digest(storage: Storage, uri: str) -> str:
    """The sha256 of one stored object: the one recorded on S3, else hashed from its bytes."""
    recorded = storage.stat(uri).sha256
    return recorded or hashlib.sha256(storage.get_bytes(uri)).hexdigest()


def write_ref(artifact: ArtifactFile, ref: PipelineRef) -> None:
    """Write ``ref`` as the artifact's file (JSON) and into its metadata."""
    body = {"kind": ref.kind, **ref.model_dump(mode="json")}
    with open(artifact.path, "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
    artifact.metadata.update(body)


def read_ref(artifact: ArtifactFile, model: type[_R]) -> _R:
    """Read the reference a step wrote into ``artifact`` (its file).

    Raises:
        MedsegError: Naming the artifact and its file when the file is missing, is not JSON,
            holds another kind of reference or misses a field.
    """
    where = f"pipeline artifact {artifact.name!r} ({artifact.path})"
    try:
        with open(artifact.path) as f:
            body = json.load(f)
    except FileNotFoundError:
        raise MedsegError(f"{where} is missing: the step that makes it wrote nothing") from None
    except (OSError, ValueError) as exc:
        raise MedsegError(f"{where} is not a JSON reference: {exc}") from None
    if not isinstance(body, dict) or body.get("kind") != model.kind:
        got = body.get("kind") if isinstance(body, dict) else type(body).__name__
        raise MedsegError(f"{where} holds a {got!r} reference, expected {model.kind!r}")
    try:
        return model.model_validate({k: v for k, v in body.items() if k != "kind"})
    except ValidationError as exc:
        raise MedsegError(f"{where} is malformed: {_field_errors(exc, model.kind)}") from None
