"""The task contract: what differs between task families, and the registry of tasks.

A task family (BraTS brain-tumour segmentation, a 2D skin-lesion classifier, …) owns only what
differs between families; storage, manifests, caching, the training loop, the engines, the model
artifact, the registry, the KFP components, the pipeline and the server stay task-blind and ask
the task of the model's config (``model.yaml``'s ``task.kind``, see
:class:`medseg.config.MedsegConfig`) for:

* the input spec (channel names, spatial dimensions) and the output spec (region or class
  names, and which of the two);
* the network (built from the model config) and the loss;
* how logits become probabilities (:meth:`Task.activate`) and probabilities the answer
  (:meth:`Task.postprocess`: BraTS nests its regions; a classifier would take the argmax);
* the label conventions its label maps may be written in, and the default one (the server's
  ``label_convention`` means something only where a task has several);
* the metrics: their names, the quality gate's metric, the per-case scores, the one-line
  definition a report and a model card state;
* the report section (:meth:`Task.overlay_png`) and the outputs written as DICOM;
* the shape of the exported graph the CPU engines run (:meth:`Task.graph_spec`): 3D windows of
  free size for segmentation, images of the task's size for a classifier.

Nothing in this module names a task: :mod:`medseg.tasks.brats` is the first family, registered
on import; a test registers its own with :func:`register_task`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict

from medseg.core.errors import InvalidInput
from medseg.core.settings import TaskSettings

if TYPE_CHECKING:  # torch only in annotations: the config (and the client) load without it
    import torch

    from medseg.config import DataConfig, InferConfig, MedsegConfig, ModelConfig, TrainConfig

__all__ = [
    "CaseScore",
    "GraphSpec",
    "InputSpec",
    "LabelMapping",
    "OutputSpec",
    "Task",
    "TaskConfig",
    "get_convention",
    "get_task",
    "known_tasks",
    "load_plugins",
    "register_task",
    "task_of_convention",
    "unregister_task",
]


class TaskConfig(BaseModel):
    """The ``task`` section of ``model.yaml``: which task, and its own parameters.

    Each task subclasses it with ``kind`` a ``Literal`` of its name (the tag of the union that
    :class:`medseg.config.MedsegConfig` validates against the registered tasks).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str


@dataclass(frozen=True)
class InputSpec:
    """What the network reads: named channels over ``spatial_dims`` axes."""

    channels: tuple[str, ...]
    spatial_dims: int = 3


@dataclass(frozen=True)
class OutputSpec:
    """What the network answers, one output channel per name, in order.

    ``regions``: possibly overlapping binary masks (multi-label, sigmoid); ``classes``: one
    class per case or voxel (softmax).
    """

    kind: Literal["regions", "classes"]
    names: tuple[str, ...]


@dataclass(frozen=True)
class GraphSpec:
    """How a task's network is exported as an ONNX graph and planned by a CPU engine.

    :mod:`medseg.inference.engine` traces the network on ``example`` and runs the graph with it;
    nothing there knows whether the input is a volume's windows or a batch of images.

    Attributes:
        example: The input shape the export traces, ``[1, C, *spatial]``; the shape of
            OpenVINO's kept plan, its batch ``plan_batch`` (or free).
        input_axes: The input's axes left free in the graph (axis → name).
        output_axes: The output's free axes.
        any_size: Whether the engine is given inputs of other spatial sizes than ``example``'s
            (whole volumes): a graph exported with fixed spatial sizes cannot run the model.
        plan_batch: Inputs per call of OpenVINO's static plan; a call's inputs of the example's
            size run in chunks of this many, the last one zero-padded up to it. ``None``: one
            plan whose batch alone is free runs each call's inputs at once (no padding).
    """

    example: tuple[int, ...]
    input_axes: Mapping[int, str]
    output_axes: Mapping[int, str]
    any_size: bool
    plan_batch: int | None


class LabelMapping(Protocol):
    """A label convention: how a stored label map and the task's output masks correspond."""

    @property
    def name(self) -> str: ...

    @property
    def labels(self) -> dict[int, str]: ...

    @property
    def allowed(self) -> frozenset[int]: ...

    def to_regions(self, label: NDArray[np.integer]) -> NDArray[np.uint8]: ...

    def from_regions(self, regions: NDArray[np.generic]) -> NDArray[np.uint8]: ...


@dataclass
class CaseScore:
    """Scores of one case, by output name (Dice and HD95 per region for segmentation)."""

    case_id: str
    dice: dict[str, float]
    hd95: dict[str, float]
    voxels_true: dict[str, int]
    voxels_pred: dict[str, int]

    @property
    def dice_mean(self) -> float:
        return sum(self.dice.values()) / len(self.dice)


@dataclass(frozen=True)
class Task(ABC):
    """One task family. Instances are stateless; the registry holds one per ``name``.

    Attributes:
        name: The ``kind`` that names it in ``model.yaml``.
        config_type: Its :class:`TaskConfig` subclass.
        inputs: Channels and spatial dimensions.
        outputs: Region or class names, in the network's output order.
        networks: The ``model.name`` values it builds.
        conventions: The label conventions its label maps may be written in, by name.
        default_convention: The one used when a request or a call names none.
        gate_metric: The evaluation metric the quality gate compares with its threshold.
        dicom_outputs: The outputs written as DICOM segments (none: no DICOM output).
    """

    name: str
    config_type: type[TaskConfig]
    inputs: InputSpec
    outputs: OutputSpec
    networks: tuple[str, ...]
    conventions: Mapping[str, LabelMapping]
    default_convention: str
    gate_metric: str
    dicom_outputs: tuple[str, ...] = field(default=())

    @abstractmethod
    def build_network(self, cfg: ModelConfig) -> torch.nn.Module:
        """The network of ``cfg``, weights freshly initialised."""

    @abstractmethod
    def loss(
        self, config: TaskConfig | None = None, counts: Sequence[int] | None = None
    ) -> torch.nn.Module:
        """The training loss, called as ``loss(logits, target)``.

        Args:
            config: The model's task section (a task's own settings, e.g. class weighting).
            counts: Training cases per output class, for a task that weighs its classes.
        """

    def static_transforms(self, data: DataConfig) -> Callable[[dict[str, Any]], Any] | None:
        """The task's own deterministic chain on ``{"image": path or array}``, or ``None``.

        ``None`` (every region-segmentation task): the shared 3D chain of
        :func:`medseg.data.transforms.static_transforms`, built by the machinery with the case's
        label convention and channel layout.
        """
        return None

    def train_transforms(
        self, train: TrainConfig, seed: int | None = None
    ) -> Callable[[dict[str, Any]], Any] | None:
        """The task's own random training chain, or ``None``.

        ``None``: the shared 3D chain of :func:`medseg.data.transforms.train_transforms`.
        """
        return None

    def sampling_weights(self, config: TaskConfig, labels: Sequence[int]) -> Sequence[float] | None:
        """Per-case sampling weights of the training cases, or ``None``.

        Args:
            config: The model's task section.
            labels: The class index of each training case.

        Returns:
            A weight per case (the trainer samples with replacement), or ``None`` for uniform
            sampling without replacement (the default).
        """
        return None

    def validation_metrics(self, probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """A validation record over the whole split at once (AUC is not a mean over cases).

        What a classification task (``outputs.kind == "classes"``) scores, from every
        validation case's class probabilities ``[N, C]`` and true class ``[N]``.
        """
        raise NotImplementedError(f"task {self.name} scores validation case by case")

    @abstractmethod
    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities of one case's logits ``[n_outputs, ...spatial]``."""

    @abstractmethod
    def postprocess(self, probabilities: np.ndarray, infer: InferConfig) -> np.ndarray:
        """The answer (uint8 masks ``[n_outputs, ...spatial]``) from the probabilities."""

    @abstractmethod
    def metric_names(self) -> tuple[str, ...]:
        """The keys of a validation record, :attr:`gate_metric` last."""

    @abstractmethod
    def validation_scores(self, pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Per-output scores ``[n_outputs]`` of one case's answer against its truth."""

    @abstractmethod
    def score_case(
        self, case_id: str, pred: torch.Tensor, truth: torch.Tensor, spacing: tuple[float, ...]
    ) -> CaseScore:
        """The evaluation's scores of one case on its own grid (``spacing`` in mm)."""

    @abstractmethod
    def metric_definition(self, convention: str) -> str:
        """The one-line name of the metric, as the model card and the report state it."""

    @abstractmethod
    def metric_conventions(self) -> str:
        """The scoring conventions (empty masks, units, means), stated in every report."""

    @abstractmethod
    def overlay_png(
        self,
        case_id: str,
        image: np.ndarray,
        channels: Sequence[str],
        truth: np.ndarray,
        pred: np.ndarray,
    ) -> bytes:
        """The report's picture of one case: truth against prediction."""

    def graph_spec(self, cfg: MedsegConfig) -> GraphSpec:
        """The exported graph's shapes: by default, windows of a volume.

        Traced on one ``infer.roi_size`` window; the batch and the spatial axes are free (any
        multiple of :func:`~medseg.tasks.networks.size_multiple`), in and out, so that one graph
        runs sliding windows and whole volumes (``infer.window: volume``). OpenVINO's kept plan runs
        ``infer.sw_batch_size`` windows.
        """
        spatial = {2 + i: axis for i, axis in enumerate("xyz"[: self.inputs.spatial_dims])}
        axes = {0: "batch", **spatial}
        return GraphSpec(
            example=(1, cfg.model.in_channels, *cfg.infer.roi_size),
            input_axes=axes,
            output_axes=axes,
            any_size=cfg.infer.window == "volume",
            plan_batch=cfg.infer.sw_batch_size,
        )

    def validation_record(self, scores: Sequence[float]) -> dict[str, float]:
        """A validation record (:meth:`metric_names`) from the mean per-output scores."""
        names = self.metric_names()
        record = dict(zip(names[:-1], scores, strict=True))
        record[self.gate_metric] = sum(scores) / len(scores)
        return record

    def convention(self, name: str | None) -> str:
        """``name``, or the default, checked to be one of the task's conventions.

        Raises:
            InvalidInput: For a convention of another task or none (names the known ones).
        """
        chosen = name or self.default_convention
        if chosen not in self.conventions:
            raise InvalidInput(
                f"label convention {chosen!r} is not one of task {self.name}'s: "
                f"{', '.join(self.conventions)}"
            )
        return chosen

    def config_defaults(self) -> dict[str, dict[str, Any]]:
        """The config fields a model of this task takes unless its YAML says otherwise.

        Its channels, its first network and the channel counts that fit them: a config that
        names only ``task: {kind: NAME}`` is a valid config of the task.
        """
        return {
            "data": {"channels": list(self.inputs.channels)},
            "model": {
                "name": self.networks[0],
                "in_channels": len(self.inputs.channels),
                "out_channels": len(self.outputs.names),
            },
        }

    def check_config(self, model: ModelConfig, channels: Sequence[str]) -> None:
        """Check that the model and data configs agree with the task.

        Raises:
            ValueError: Naming the first disagreement (pydantic reports it under the config).
        """
        want = self.inputs.channels
        if sorted(channels) != sorted(want):
            raise ValueError(
                f"data.channels must be a permutation of task {self.name}'s {want}, "
                f"got {tuple(channels)}"
            )
        if model.name not in self.networks:
            raise ValueError(
                f"model.name {model.name!r} is not a network of task {self.name} "
                f"({', '.join(self.networks)})"
            )
        if model.in_channels != len(want):
            raise ValueError(
                f"model.in_channels is {model.in_channels}, task {self.name} has {len(want)} "
                f"input channels {want}"
            )
        if model.out_channels != len(self.outputs.names):
            raise ValueError(
                f"model.out_channels is {model.out_channels}, task {self.name} has "
                f"{len(self.outputs.names)} outputs {self.outputs.names}"
            )


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry (idempotent for the same object).

    Raises:
        InvalidInput: If another task has the same name or one of its conventions' names.
    """
    if _TASKS.get(task.name, task) is not task:
        raise InvalidInput(f"task {task.name!r} is already registered")
    for other in _TASKS.values():
        clash = set(other.conventions) & set(task.conventions) if other is not task else set()
        if clash:
            raise InvalidInput(
                f"task {task.name!r}: label convention(s) {sorted(clash)} already belong to "
                f"task {other.name!r}"
            )
    _TASKS[task.name] = task
    return task


def unregister_task(name: str) -> None:
    """Remove a task (a test's own, when it is done)."""
    _TASKS.pop(name, None)


def load_plugins() -> None:
    """Import and register the tasks ``MEDSEG_TASK_PLUGINS`` names (:class:`TaskSettings`).

    Raises:
        InvalidInput: If a reference cannot be imported or is not a :class:`Task`.
    """
    for ref in TaskSettings().references():
        module, _, attribute = ref.partition(":")
        try:
            task = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise InvalidInput(f"MEDSEG_TASK_PLUGINS: cannot load {ref!r}: {exc}") from None
        if not isinstance(task, Task):
            raise InvalidInput(f"MEDSEG_TASK_PLUGINS: {ref!r} is not a medseg Task")
        if _TASKS.get(task.name) is not task:
            register_task(task)


def task_of_convention(name: str) -> Task:
    """The registered task one of whose label conventions is ``name`` (a manifest's).

    Raises:
        InvalidInput: For an unknown convention (also a ``ValueError``).
    """
    get_convention(name)
    return next(t for t in _TASKS.values() if name in t.conventions)


def known_tasks() -> tuple[str, ...]:
    """The registered task names."""
    return tuple(_TASKS)


def get_task(name: str) -> Task:
    """The registered task ``name``.

    Raises:
        InvalidInput: For an unknown name, listing the known ones (also a ``ValueError``).
    """
    if name not in _TASKS:
        load_plugins()
    try:
        return _TASKS[name]
    except KeyError:
        raise InvalidInput(f"unknown task {name!r}; known: {', '.join(_TASKS)}") from None


def get_convention(name: str) -> LabelMapping:
    """A label convention of any registered task, by name.

    Raises:
        InvalidInput: For an unknown name, listing the known ones (also a ``ValueError``).
    """
    if not any(name in t.conventions for t in _TASKS.values()):
        load_plugins()
    for task in _TASKS.values():
        if name in task.conventions:
            return task.conventions[name]
    known = [c for t in _TASKS.values() for c in t.conventions]
    raise InvalidInput(f"unknown label convention {name!r}; known: {', '.join(known)}")


def config_of(raw: Any) -> TaskConfig:
    """The task config in ``raw`` (a mapping or a :class:`TaskConfig`), by its ``kind``.

    The registry is the union's list of members, ``kind`` its tag: the task's own
    ``config_type`` validates the rest.

    Raises:
        InvalidInput: For a missing or unknown ``kind``.
        pydantic.ValidationError: If the task's config rejects the rest.
    """
    if isinstance(raw, TaskConfig):
        return get_task(raw.kind).config_type.model_validate(raw.model_dump())
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"must be a mapping with a 'kind' (one of {', '.join(_TASKS)})")
    kind = raw.get("kind")
    if not isinstance(kind, str):
        raise InvalidInput(f"needs a 'kind', one of {', '.join(_TASKS)}")
    return get_task(kind).config_type.model_validate(dict(raw))
