"""The KServe custom predictor: a ``kserve.Model`` that segments brain MRI studies.

Open Inference Protocol v2 (REST and gRPC) inputs, one of:

``nifti`` (BYTES, shape ``[1]`` or ``[4]``)
    One 4D NIfTI (``.nii`` or ``.nii.gz``), or four 3D NIfTI files, one per modality. Their
    channel order is the request/input parameter ``channels`` (comma-separated modality names;
    default ``t1,t1gd,t2,flair``; an MSD Task01 image is ``flair,t1,t1gd,t2``). In a JSON body
    the elements are base64 strings, marked by the input parameter ``content_encoding: base64``.
``image`` (FP32 or FP16, shape ``[1, 4, X, Y, Z]`` or ``[4, X, Y, Z]``)
    A raw tensor in ``channels`` order, with its geometry as the parameter ``affine``
    (16 comma-separated numbers, row-major) or ``spacing`` (3 numbers, mm; identity directions).

Request parameters: ``label_convention`` (``brats2021`` default, ``brats2023``, ``msd``) for the
mask; ``probabilities`` (bool) to add the probabilities output.

Outputs: ``mask`` (BYTES ``[1]``: a gzipped NIfTI label map on the input's grid and affine),
``volumes_ml`` (FP32 ``[3]``: TC, WT, ET in mL), and on request ``probabilities`` (FP16
``[1, 3, X, Y, Z]``). v1 ``:predict`` takes ``{"instances": [{"nifti_b64": …}]}`` or
``{"instances": [{"modalities": {"t1": b64, …}}]}`` and answers base64 masks and volumes.

Every bad input raises ``kserve.errors.InvalidInput`` (HTTP 400, gRPC INVALID_ARGUMENT) naming the
input and the problem. At most ``max_concurrency`` cases are segmented at once; the rest wait.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from kserve import Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse

from medseg.config import CHANNELS, REGIONS
from medseg.errors import MedsegError
from medseg.infer import CaseSegmentation, Segmenter, load_model, segment_case
from medseg.labels import CONVENTIONS
from medseg.storage import Storage

__all__ = ["MedsegPredictor", "decode_nifti", "encode_nifti"]

_TENSOR_TYPES = {"FP32": np.float32, "FP16": np.float16}
#: Largest edge accepted, in voxels (a BraTS volume is 240×240×155).
MAX_EDGE = 512


@dataclass
class Case:
    """A decoded request: a channel-first image in canonical channel order and its affine."""

    image: np.ndarray
    affine: np.ndarray


def _param(params: Any, key: str, default: Any = None) -> Any:
    """A parameter from REST (plain values) or gRPC (``InferParameter``) parameter maps."""
    if not params or key not in params:
        return default
    value = params[key]
    for field in ("string_param", "bool_param", "int64_param", "double_param"):
        if hasattr(value, "HasField") and value.HasField(field):
            return getattr(value, field)
    return value


def _numbers(value: Any, count: int, what: str) -> np.ndarray:
    try:
        items = value.split(",") if isinstance(value, str) else list(value)
        arr = np.asarray([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInput(f"parameter {what!r} must be {count} numbers, got {value!r}") from None
    if arr.size != count or not np.isfinite(arr).all():
        raise InvalidInput(f"parameter {what!r} must be {count} finite numbers, got {value!r}")
    return arr


def _channel_order(params: Any) -> list[int]:
    """Index, in the request's channel order, of each canonical channel."""
    raw = _param(params, "channels")
    if raw is None:
        return list(range(len(CHANNELS)))
    names = [c.strip().lower() for c in (raw.split(",") if isinstance(raw, str) else raw)]
    aliases = {"t1ce": "t1gd", "t1c": "t1gd", "t2f": "flair", "t1n": "t1", "t2w": "t2"}
    names = [aliases.get(n, n) for n in names]
    if sorted(names) != sorted(CHANNELS):
        raise InvalidInput(f"parameter 'channels' must name {', '.join(CHANNELS)}; got {raw!r}")
    return [names.index(c) for c in CHANNELS]


def decode_nifti(data: bytes, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (float32, decoded once) and affine of NIfTI-1/2 bytes, gzipped or not.

    Raises:
        InvalidInput: If the bytes are empty or not a readable NIfTI.
    """
    if not data:
        raise InvalidInput(f"{what} is empty")
    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        for cls in (nib.Nifti1Image, nib.Nifti2Image):
            try:
                img = cls.from_bytes(raw)
                # a full read: truncation shows here
                return np.asarray(img.dataobj, dtype=np.float32), img.affine
            except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError):
                continue
    except (OSError, EOFError, ValueError, gzip.BadGzipFile) as exc:
        raise InvalidInput(f"{what} is not a readable NIfTI: {exc}") from None
    raise InvalidInput(f"{what} is not a NIfTI-1 or NIfTI-2 image")


def encode_nifti(label: np.ndarray, affine: np.ndarray) -> bytes:
    """A uint8 label map as gzipped NIfTI-1 bytes (fast compression: label maps are sparse)."""
    img = nib.Nifti1Image(label.astype(np.uint8), affine)
    img.header.set_data_dtype(np.uint8)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _reorder(image: np.ndarray, order: list[int]) -> np.ndarray:
    """Channels in canonical order; no copy of a full case when they already are."""
    return image if order == list(range(len(order))) else image[order]


def _check_image(image: np.ndarray, what: str) -> np.ndarray:
    if image.ndim != 4 or image.shape[0] != len(CHANNELS):
        raise InvalidInput(
            f"{what}: expected {len(CHANNELS)} channels of 3D volumes ([4, X, Y, Z]), "
            f"got shape {list(image.shape)}"
        )
    if min(image.shape[1:]) < 1 or max(image.shape[1:]) > MAX_EDGE:
        raise InvalidInput(
            f"{what}: each edge must be 1..{MAX_EDGE} voxels, got {list(image.shape[1:])}"
        )
    if not np.isfinite(image).all():
        raise InvalidInput(f"{what} contains NaN or Inf values")
    return image


class _BytesInput:
    """The part of ``InferInput`` that :func:`_from_niftis` reads, over plain bytes."""

    parameters = None

    def __init__(self, blobs: list[bytes]):
        self._blobs = blobs

    def as_numpy(self) -> np.ndarray:
        arr = np.empty(len(self._blobs), dtype=np.object_)
        arr[:] = self._blobs
        return arr


def _from_niftis(inp: InferInput | _BytesInput, params: Any) -> Case:
    blobs = inp.as_numpy().reshape(-1)
    if _param(inp.parameters, "content_encoding") == "base64":  # BYTES sent inside JSON
        blobs = np.array(
            [_b64(bytes(b).decode("ascii", "replace"), "input 'nifti'") for b in blobs],
            dtype=np.object_,
        )
    has_own = _param(inp.parameters, "channels") is not None
    order = _channel_order(inp.parameters if has_own else params)
    if blobs.size == 1:
        data, affine = decode_nifti(bytes(blobs[0]), "input 'nifti'")
        if data.ndim != 4:
            raise InvalidInput(
                f"input 'nifti': one file must be a 4D image [X, Y, Z, 4], got shape "
                f"{list(data.shape)}; or send four 3D files"
            )
        image = _reorder(np.moveaxis(data, -1, 0), order)
        return Case(_check_image(np.ascontiguousarray(image), "input 'nifti'"), affine)
    if blobs.size != len(CHANNELS):
        raise InvalidInput(
            f"input 'nifti' holds {blobs.size} files: send one 4D NIfTI or {len(CHANNELS)} 3D ones"
        )
    decoded = [decode_nifti(bytes(b), f"input 'nifti' file {i}") for i, b in enumerate(blobs)]
    volumes = [v for v, _ in decoded]
    shapes = {v.shape for v in volumes}
    if len(shapes) != 1 or volumes[0].ndim != 3:
        raise InvalidInput(
            f"input 'nifti': the four files must be 3D volumes of one shape, got "
            f"{[list(v.shape) for v in volumes]}"
        )
    image = np.stack([volumes[i] for i in order])
    return Case(_check_image(image, "input 'nifti'"), decoded[order[0]][1])


def _from_tensor(inp: InferInput, params: Any) -> Case:
    has_own = _param(inp.parameters, "channels") is not None
    if inp.datatype not in _TENSOR_TYPES:
        raise InvalidInput(f"input 'image': datatype must be FP32 or FP16, got {inp.datatype}")
    shape = list(inp.shape)
    if len(shape) == 5 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 4:
        raise InvalidInput(f"input 'image': shape must be [1, 4, X, Y, Z], got {list(inp.shape)}")
    try:
        arr = inp.as_numpy()
    except ValueError as exc:
        raise InvalidInput(f"input 'image': data does not match shape {inp.shape}: {exc}") from None
    image = _check_image(arr.reshape(shape), "input 'image'")
    image = _reorder(image, _channel_order(inp.parameters if has_own else params))
    affine_raw = _param(inp.parameters, "affine", _param(params, "affine"))
    spacing_raw = _param(inp.parameters, "spacing", _param(params, "spacing"))
    if affine_raw is not None:
        affine = _numbers(affine_raw, 16, "affine").reshape(4, 4)
        if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise InvalidInput("parameter 'affine' is singular")
    else:
        spacing = _numbers(spacing_raw if spacing_raw is not None else "1,1,1", 3, "spacing")
        if (spacing <= 0).any():
            raise InvalidInput(f"parameter 'spacing' must be positive, got {spacing.tolist()}")
        affine = np.diag([*spacing, 1.0])
    return Case(image, affine)


def decode_request(request: InferRequest) -> Case:
    """The case in a v2 request (see the module docstring for the accepted inputs)."""
    if len(request.inputs) != 1:
        names = [i.name for i in request.inputs]
        raise InvalidInput(f"expected one input, 'nifti' or 'image'; got {names}")
    inp = request.inputs[0]
    if inp.name == "nifti":
        if inp.datatype != "BYTES":
            raise InvalidInput(f"input 'nifti': datatype must be BYTES, got {inp.datatype}")
        return _from_niftis(inp, request.parameters)
    if inp.name == "image":
        return _from_tensor(inp, request.parameters)
    raise InvalidInput(f"unknown input {inp.name!r}: send 'nifti' (BYTES) or 'image' (FP32/FP16)")


class MedsegPredictor(Model):
    """SegResNet brain tumour segmentation behind KServe.

    Args:
        name: Model name in the URL (``/v2/models/NAME/infer``).
        model_dir: Local folder or ``s3://`` prefix with ``model.yaml`` and ``model.pt``
            (``/mnt/models`` when KServe's storage initializer fetched it).
        max_concurrency: Cases segmented at once; further requests queue.
        storage: Storage for ``s3://`` model locations (from the environment by default).
    """

    def __init__(
        self,
        name: str,
        model_dir: str,
        max_concurrency: int = 1,
        storage: Storage | None = None,
    ):
        super().__init__(name)
        self.model_dir = model_dir
        self.segmenter: Segmenter | None = None
        self.max_concurrency = max_concurrency
        self._slots: asyncio.Semaphore | None = None
        self._storage = storage

    def load(self) -> bool:
        """Load the weights and config; the server reports ready only after this."""
        storage = self._storage or (Storage() if self.model_dir.startswith("s3://") else None)
        try:
            self.segmenter = load_model(self.model_dir, storage or Storage())
        except MedsegError as exc:
            raise RuntimeError(f"cannot load model {self.name}: {exc}") from None
        self.ready = True
        return self.ready

    async def get_input_types(self) -> list[dict[str, Any]]:
        return [
            {"name": "nifti", "datatype": "BYTES", "shape": [-1]},
            {"name": "image", "datatype": "FP32", "shape": [1, len(CHANNELS), -1, -1, -1]},
        ]

    async def get_output_types(self) -> list[dict[str, Any]]:
        return [
            {"name": "mask", "datatype": "BYTES", "shape": [1]},
            {"name": "volumes_ml", "datatype": "FP32", "shape": [len(REGIONS)]},
            {"name": "probabilities", "datatype": "FP16", "shape": [1, len(REGIONS), -1, -1, -1]},
        ]

    async def _segment(self, case: Case) -> tuple[CaseSegmentation, float]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        assert self.segmenter is not None
        async with self._slots:
            started = time.perf_counter()
            result = await asyncio.to_thread(segment_case, self.segmenter, case.image, case.affine)
            return result, time.perf_counter() - started

    async def predict(
        self,
        payload: dict[str, Any] | InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        if isinstance(payload, InferRequest):
            return await self._predict_v2(payload)
        return await self._predict_v1(payload)

    async def _predict_v2(self, request: InferRequest) -> InferResponse:
        params = request.parameters
        convention = _convention(_param(params, "label_convention", "brats2021"))
        want_probs = _param(params, "probabilities", False) in (True, "true", "True", 1)
        case = await asyncio.to_thread(decode_request, request)
        result, seconds = await self._segment(case)
        mask = encode_nifti(result.label_map(convention), result.affine)
        outputs = [
            _output("mask", "BYTES", [1], np.array([mask], dtype=np.object_)),
            _output(
                "volumes_ml",
                "FP32",
                [len(REGIONS)],
                np.array([result.volumes_ml[r] for r in REGIONS], dtype=np.float32),
                {"regions": ",".join(REGIONS)},
            ),
        ]
        if want_probs:
            probs = result.probabilities.astype(np.float16)[None]
            outputs.append(_output("probabilities", "FP16", list(probs.shape), probs))
        return InferResponse(
            model_name=self.name,
            infer_outputs=outputs,
            response_id=request.id,
            parameters={
                "label_convention": convention,
                "compute_ms": round(seconds * 1000),
            },
            use_binary_outputs=True,
        )

    async def _predict_v1(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        instances = payload.get("instances") if isinstance(payload, Mapping) else None
        if not isinstance(instances, list) or not instances:
            raise InvalidInput("v1 request needs a non-empty 'instances' list")
        predictions = []
        for n, inst in enumerate(instances):
            if not isinstance(inst, Mapping):
                raise InvalidInput(f"instance {n} must be an object")
            convention = _convention(inst.get("label_convention", "brats2021"))
            case = await asyncio.to_thread(_decode_v1, inst, n)
            result, seconds = await self._segment(case)
            mask = encode_nifti(result.label_map(convention), result.affine)
            predictions.append(
                {
                    "mask_b64": base64.b64encode(mask).decode(),
                    "label_convention": convention,
                    "volumes_ml": result.volumes_ml,
                    "compute_ms": round(seconds * 1000),
                }
            )
        return {"predictions": predictions}


def _convention(name: Any) -> str:
    if name not in CONVENTIONS:
        raise InvalidInput(
            f"unknown label_convention {name!r}; use one of {', '.join(sorted(CONVENTIONS))}"
        )
    return str(name)


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise InvalidInput(f"{what} is not valid base64") from None


def _decode_v1(inst: Mapping[str, Any], n: int) -> Case:
    if "nifti_b64" in inst:
        blobs = [_b64(inst["nifti_b64"], f"instance {n} 'nifti_b64'")]
        params: dict[str, Any] = {"channels": inst.get("channels")} if "channels" in inst else {}
    elif isinstance(inst.get("modalities"), Mapping):
        mods = inst["modalities"]
        missing = [c for c in CHANNELS if c not in mods]
        if missing:
            raise InvalidInput(f"instance {n} 'modalities' lacks {', '.join(missing)}")
        blobs = [_b64(mods[c], f"instance {n} modality {c}") for c in CHANNELS]
        params = {}
    else:
        raise InvalidInput(f"instance {n} needs 'nifti_b64' or 'modalities'")
    return _from_niftis(_BytesInput(blobs), params)


def _output(
    name: str,
    datatype: str,
    shape: list[int],
    data: np.ndarray,
    params: dict[str, Any] | None = None,
) -> InferOutput:
    out = InferOutput(name=name, shape=shape, datatype=datatype, parameters=params)
    out.set_data_from_numpy(data, binary_data=True)
    return out
