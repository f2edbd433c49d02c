"""One typed configuration for data, model, training and inference.

The same :class:`MedsegConfig` is read by the CLI, the KFP components, the training entrypoint
and the model server. It is saved next to the weights as ``model.yaml`` so that serving rebuilds
exactly the preprocessing that training used. Storage connection settings live apart, in
:mod:`medseg.core.settings`, because they carry secrets and never travel with a model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from medseg.core.errors import InvalidInput
from medseg.tasks import DEFAULT_TASK, TaskConfig, config_of, get_task, known_tasks
from medseg.tasks.brats import CHANNELS, REGIONS, BratsTaskConfig

#: The half-precision type autocast computes in (see :mod:`medseg.inference.precision`): ``float16``
#: (any CUDA GPU) or ``bfloat16`` (Ampere and newer; no loss scaling needed).
AmpDtype = Literal["float16", "bfloat16"]

#: How the learning rate moves over the epochs (see :class:`TrainConfig`).
LrSchedule = Literal["cosine", "constant"]

__all__ = [
    "CHANNELS",
    "REGIONS",
    "DataConfig",
    "InferConfig",
    "MedsegConfig",
    "ModelConfig",
    "SplitConfig",
    "TrainConfig",
]
# CHANNELS and REGIONS are BraTS's (medseg.tasks.brats), re-exported for the code and tests that
# name them; the generic machinery asks the config's task instead.


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Frozen):
    """Static preprocessing: what is done once per case and cached.

    Attributes:
        channels: Modality order of the image tensor: a permutation of the task's channels
            (checked by :class:`MedsegConfig`, which knows the task).
        orientation: Axis codes the volumes are reoriented to.
        spacing: Target voxel spacing in mm.
        crop_foreground: Crop to the bounding box of non-zero image voxels.
        foreground_margin: Voxels kept around the foreground box.
        normalize_nonzero: Per-channel z-score over non-zero voxels only.
        image_size: Height and width a 2D task's images are resized to once, before caching
            (left out of the fingerprint when unset, so 3D configs keep their caches).
    """

    channels: tuple[str, ...] = CHANNELS
    orientation: str = "RAS"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    crop_foreground: bool = True
    foreground_margin: int = Field(default=0, ge=0)
    normalize_nonzero: bool = True
    image_size: tuple[int, int] | None = Field(default=None, exclude_if=lambda v: v is None)

    def fingerprint(self) -> str:
        """Short content hash that keys the cache of preprocessed cases."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class SplitConfig(_Frozen):
    """Seeded train/validation split written into the dataset manifest."""

    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    seed: int = 0


class ModelConfig(_Frozen):
    """The network: its name (one the task builds) and SegResNet's hyper-parameters.

    ``in_channels`` and ``out_channels`` must agree with the task (checked by
    :class:`MedsegConfig`).
    """

    name: str = "SegResNet"
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    blocks_up: tuple[int, ...] = (1, 1, 1)
    init_filters: int = Field(default=16, gt=0)
    in_channels: int = 4
    out_channels: int = 3
    dropout_prob: float = Field(default=0.2, ge=0.0, lt=1.0)


class TrainConfig(_Frozen):
    """Optimisation and the random (per-epoch) augmentation.

    ``amp`` (autocast in ``amp_dtype``, CUDA only) and ``channels_last`` are the GPU path's
    switches, see :mod:`medseg.inference.precision`.

    Attributes:
        foreground_crops: Share of training crops centred on a labelled voxel (MONAI's
            ``RandCropByPosNegLabeld``, the rest centred on background); 0 (the default):
            crops drawn uniformly over the case.
        lr_schedule: ``cosine`` (the default: cosine annealing over ``epochs``) or ``constant``.
        compile: Run the training forward and backward through ``torch.compile``.
    """

    epochs: int = Field(default=50, gt=0)
    batch_size: int = Field(default=1, gt=0)
    lr: float = Field(default=2.5e-4, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    roi_size: tuple[int, int, int] = (96, 96, 64)
    num_workers: int = Field(default=2, ge=0)
    val_every: int = Field(default=1, gt=0)
    amp: bool = True
    amp_dtype: AmpDtype = "float16"
    channels_last: bool = False
    foreground_crops: float = Field(default=0.0, ge=0.0, le=1.0)
    lr_schedule: LrSchedule = "cosine"
    compile: bool = False
    seed: int = 0


#: How the three region outputs are made nested (ET ⊆ TC ⊆ WT) before they become a label map
#: (see :func:`medseg.tasks.brats.nest_regions`).
Nesting = Literal["disjoint", "intersect", "union"]

#: What runs the network's forward pass at inference (see :mod:`medseg.inference.engine`): ``torch``
#: (the reference), ``onnxruntime`` or ``openvino`` (the artifact's exported ``model.onnx``), or
#: ``auto`` (the fastest on this machine when the artifact carries the graph, else ``torch``).
Engine = Literal["auto", "torch", "onnxruntime", "openvino"]

#: The arithmetic of the CPU graph engines (see :mod:`medseg.inference.engine`): ``f32`` (the
#: default, the same numbers on every CPU) or ``bf16`` (OpenVINO only, and only on CPUs with native
#: bf16; on others it runs as ``f32``). Never left to the runtime: OpenVINO's CPU plugin would
#: otherwise pick bf16 by itself wherever the CPU has it, so one model would answer differently by
#: node.
Precision = Literal["f32", "bf16"]

#: How inference tiles a preprocessed volume (see
#: :meth:`medseg.inference.infer.Segmenter.probabilities`): ``volume`` runs the whole
#: (foreground-cropped) volume as one window, padded up to
#: :func:`medseg.tasks.networks.size_multiple`; ``sliding`` runs overlapping ``roi_size`` windows
#: blended with Gaussian weights.
Window = Literal["volume", "sliding"]
#: ``volume`` windows up to this many voxels after padding (8 Mi, e.g. 256×256×128); a larger
#: volume is segmented in ``sliding`` windows so that one request's memory stays bounded.
#: A full-size BraTS case cropped to the brain has 3–5 Mi voxels.
DEFAULT_VOLUME_MAX_VOXELS = 8 * 2**20


class InferConfig(_Frozen):
    """Sliding-window inference, and how its output becomes a label map.

    Attributes:
        window: ``volume`` (the default: the whole cropped volume in one window, each voxel
            computed once) or ``sliding`` (``roi_size`` windows overlapping by ``overlap``,
            Gaussian-blended), see :data:`Window`. ``volume`` is 3–5× faster on the CPU on a
            full-size case at the same Dice (``benchmarks/bench_engine.py``).
        volume_max_voxels: Largest padded volume run as one window; above it, ``sliding``.
        roi_size: Sliding-window size (``sliding``; also the shape the graph is exported with).
        overlap: Overlap of neighbouring windows (``sliding``).
        sw_batch_size: Windows per forward pass (``sliding``).
        threshold: Probability above which a voxel is in a region.
        nesting: ``disjoint`` (the most probable of the four disjoint classes; no threshold),
            ``intersect`` (ET := ET ∧ TC, TC := TC ∧ WT) or ``union`` (TC := TC ∨ ET,
            WT := WT ∨ TC). ``disjoint`` scored best on the demo's validation cases (label-map
            mean Dice, two training seeds: 0.909 and 0.870, against 0.903/0.856 for
            ``intersect`` and 0.871/0.799 for ``union``, the label map of the raw thresholds).
        engine: What runs the forward pass (:data:`Engine`); overridable at load time.
        precision: The graph engines' arithmetic (:data:`Precision`): ``f32`` by default;
            ``bf16`` is an explicit choice for the ``openvino`` engine (faster on CPUs with
            native bf16, probabilities within ~1e-2 of ``f32``: ``benchmarks/bench_engine.py``
            reports its Dice against ``f32``).
        amp: Autocast on CUDA (never on the CPU, see :mod:`medseg.inference.precision`).
        amp_dtype: Autocast's half-precision type.
        channels_last: Inputs in channels-last layout, by rank (3D for volumes, 2D for images;
            PyTorch engine).
    """

    window: Window = "volume"
    volume_max_voxels: int = Field(default=DEFAULT_VOLUME_MAX_VOXELS, gt=0)
    roi_size: tuple[int, int, int] = (96, 96, 64)
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(default=1, gt=0)
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    nesting: Nesting = "disjoint"
    engine: Engine = "auto"
    precision: Precision = "f32"
    amp: bool = True
    amp_dtype: AmpDtype = "float16"
    channels_last: bool = False


class MedsegConfig(_Frozen):
    """The whole configuration, as saved in ``model.yaml``.

    ``task`` names the task (:mod:`medseg.tasks`): a union of the registered tasks' configs,
    tagged by ``kind``. A file without it is a BraTS model (every ``model.yaml`` written before
    tasks existed). The data and model sections must fit the task: ``data.channels`` a
    permutation of its channels, ``model`` one of its networks with as many input and output
    channels as it has channels and outputs.
    """

    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    infer: InferConfig = InferConfig()
    task: SerializeAsAny[TaskConfig] = BratsTaskConfig()

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, value: Any) -> Any:
        """Fill the data and model fields a config leaves out from its task's defaults."""
        if not isinstance(value, dict) or not isinstance(value.get("task"), dict):
            return value
        kind = value["task"].get("kind")
        if kind not in known_tasks():
            return value  # the task field's validator names the problem
        filled = dict(value)
        for section, defaults in get_task(kind).config_defaults().items():
            given = filled.get(section)
            if given is None:
                filled[section] = defaults
            elif isinstance(given, dict):
                filled[section] = {**defaults, **given}
        return filled

    @field_validator("task", mode="before")
    @classmethod
    def _registered_task(cls, value: Any) -> TaskConfig:
        return config_of({"kind": DEFAULT_TASK} if value is None else value)

    @model_validator(mode="after")
    def _fits_task(self) -> MedsegConfig:
        get_task(self.task.kind).check_config(self.model, self.data.channels)
        return self

    @classmethod
    def load(cls, path: str | Path) -> MedsegConfig:
        """Read a YAML file; missing sections take their defaults.

        Raises:
            InvalidInput: If the file is unreadable, not YAML, or not a valid config; the
                message names the file and the first problem.
        """
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise InvalidInput(f"config {path}: {exc.strerror or exc}") from None
        return cls.from_yaml(text, f"config {path}")

    def with_epochs(self, epochs: int) -> MedsegConfig:
        """This config with ``train.epochs`` set to ``epochs`` when above 0, else unchanged."""
        if epochs <= 0:
            return self
        return self.model_copy(update={"train": self.train.model_copy(update={"epochs": epochs})})

    @classmethod
    def read(cls, location: str | Path) -> MedsegConfig:
        """The config YAML at a local path or an ``s3://`` URI (:meth:`load` for a path).

        Raises:
            InvalidInput: As :meth:`load`; ObjectNotFound if there is no such object.
        """
        from medseg.core.storage import Storage, is_s3

        if is_s3(str(location)):
            return cls.from_yaml(Storage().get_bytes(str(location)), f"config {location}")
        return cls.load(location)

    @classmethod
    def from_yaml(cls, text: str | bytes, what: str, task: str = "") -> MedsegConfig:
        """The config in YAML text (a file, an object, a ``model.yaml``, a pipeline parameter).

        Args:
            text: The YAML; empty means every default.
            what: How messages name it (``config runs/a.yaml``).
            task: A task the config must be of (empty: its own, BraTS when it names none); a
                config that names no task becomes one of ``task`` (:meth:`_task_defaults`).

        Raises:
            InvalidInput: If it is not YAML or not a valid config, or is another task's,
                naming the first problem.
        """
        try:
            doc = yaml.safe_load(text) or {}
            if task and isinstance(doc, dict):
                named = (doc.get("task") or {}).get("kind", task)
                if named != task:
                    raise InvalidInput(f"{what}: task: the config is of task {named}, not {task}")
                doc["task"] = {**(doc.get("task") or {}), "kind": task}
            return cls.model_validate(doc)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            problem = getattr(exc, "problem", None) or exc
            raise InvalidInput(f"{what}: not valid YAML{line} ({problem})") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "the file"
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise InvalidInput(f"{what}: {field}: {first['msg']}{more}") from None

    def to_yaml(self) -> str:
        """Serialise as YAML (tuples become lists)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
