"""The predictor's protocol for a segmentation task: requests into jobs, jobs into cases, answers.

(A classification task's protocol is :mod:`model_server.classifier`.)

Open Inference Protocol v2 (REST and gRPC) inputs, one of:

``nifti`` (BYTES, shape ``[1]`` or ``[4]``)
    One 4D NIfTI (``.nii`` or ``.nii.gz``), or four 3D NIfTI files, one per modality. Their
    channel order is the request/input parameter ``channels`` (comma-separated modality names);
    without it, the model's own order (``data.channels`` of its ``model.yaml``). In a JSON body
    the elements are base64 strings, marked by the input parameter ``content_encoding: base64``.
``image`` (FP32 or FP16, shape ``[1, 4, X, Y, Z]`` or ``[4, X, Y, Z]``)
    A raw tensor in ``channels`` order (the model's by default), with its geometry as the
    parameter ``affine`` (16 numbers, row-major) or ``spacing`` (3 numbers, mm).

Request parameters: ``label_convention`` for the mask, one of the model's task's (BraTS:
``brats2021`` default, ``brats2023``, ``msd``); ``probabilities`` (bool) to add the
probabilities output. All of them are validated by :func:`medseg.serving.codec.validate_params`, for
REST v1/v2 and gRPC alike.

Outputs (:data:`OUTPUTS`): ``mask`` (BYTES ``[1]``: a gzipped NIfTI label map on the input's
grid and affine), ``volumes_ml`` (FP32 ``[3]``: TC, WT, ET in mL), ``labels`` (UINT8
``[X, Y, Z]``: the same label map as a plain tensor on the request's grid, for clients that do
not read NIfTI; with the binary data extension or gRPC ``raw_output_contents`` it is the raw
voxels, C order) and ``probabilities`` (FP16 ``[1, 3, X, Y, Z]``). A request that names its
outputs gets those (and only those are encoded); one that names none gets all but
``probabilities``, which needs the parameter ``probabilities`` or its name. v1 ``:predict``
takes ``{"instances": [{"nifti_b64": …}]}`` or ``{"instances": [{"modalities": {"t1": b64, …}}]}``
and answers base64 masks and volumes.

Every answer names the model that gave it: the response parameters ``model_version``
(``NAME@vN`` of the registry) and ``model_sha256`` (of ``model.pt``), on v1 predictions as well,
and the HTTP headers :data:`VERSION_HEADER` and :data:`SHA256_HEADER` (see
:func:`medseg.registry.register.model_identity`).

:class:`SegmentationProtocol` validates a request into :class:`Job` s (shapes, datatypes,
parameters; nothing decoded), decodes a job into a :class:`Case` within the limits (see
:mod:`medseg.serving.codec`) and checks its size after resampling; :func:`v2_response` and
:func:`v1_predictions` encode the answer. Every bad input raises :class:`InputError` naming the
input, the problem and the limit; the predictor answers it as ``kserve.errors.InvalidInput``
(:func:`invalid`: HTTP 400, gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse

from medseg.core.errors import InputError
from medseg.core.settings import ServerLimits
from medseg.inference.infer import CaseSegmentation, Segmenter
from medseg.io.nifti import encode_label_map
from medseg.serving.codec import (
    InferParams,
    check_resampled_size,
    check_shape,
    decode_nifti,
    split_bytes_tensor,
    validate_params,
)
from model_server import compat

__all__ = [
    "OUTPUTS",
    "SHA256_HEADER",
    "VERSION_HEADER",
    "Case",
    "Done",
    "Job",
    "SegmentationProtocol",
    "infer_output",
    "invalid",
    "output_types",
    "plain_params",
    "v1_predictions",
    "v2_response",
]

#: The model's outputs and their datatypes; :func:`output_types` gives their shapes.
OUTPUTS = {"mask": "BYTES", "volumes_ml": "FP32", "labels": "UINT8", "probabilities": "FP16"}

#: The HTTP headers of every answer: the served model's registry version and weights' sha256.
VERSION_HEADER = "X-Medseg-Model-Version"
SHA256_HEADER = "X-Medseg-Model-Sha256"

#: At most this many instances in one v1 request.
_V1_INSTANCES = 8

_TENSOR_TYPES = {"FP32": np.float32, "FP16": np.float16}


def output_types(outputs: int) -> dict[str, tuple[str, list[int]]]:
    """The outputs as the metadata lists them, for a task of ``outputs`` regions.

    A ``-1`` is the case's own size.
    """
    shapes = {
        "mask": [1],
        "volumes_ml": [outputs],
        "labels": [-1, -1, -1],
        "probabilities": [1, outputs, -1, -1, -1],
    }
    return {name: (datatype, shapes[name]) for name, datatype in OUTPUTS.items()}


def plain_params(params: Any) -> dict[str, Any] | None:
    """REST (plain values) or gRPC (``InferParameter``) parameter maps as plain values."""
    if params is None:
        return None
    if not isinstance(params, Mapping) and not hasattr(params, "items"):
        raise InvalidInput(f"'parameters' must be an object, got {type(params).__name__}")
    out = {}
    for key, value in params.items():
        if hasattr(value, "WhichOneof"):
            choice = value.WhichOneof("parameter_choice")
            value = getattr(value, choice) if choice else None
        out[key] = value
    return out


def invalid(exc: InputError) -> InvalidInput:
    """A bad input as kserve's ``InvalidInput`` (HTTP 400, gRPC INVALID_ARGUMENT)."""
    return InvalidInput(str(exc))


@dataclass
class Job:
    """A validated request for one case, not yet decoded.

    Attributes:
        what: How messages name the input.
        params: Its validated parameters.
        order: Index, in the request's channel order, of each of the model's channels.
        blobs: NIfTI files (one 4D, or one 3D per channel), or None for a tensor.
        b64: The blobs are base64 text, decoded with the files (inside the slot).
        tensor: The raw tensor input, or None for NIfTI.
        shape: The tensor's ``[C, X, Y, Z]``.
        outputs: The outputs to answer (v2).
    """

    what: str
    params: InferParams
    order: list[int]
    outputs: frozenset[str] = frozenset()
    blobs: list[Any] | None = None
    b64: bool = False
    tensor: InferInput | None = None
    shape: list[int] = field(default_factory=list)


@dataclass
class Case:
    """A decoded case: a channel-first image in the model's channel order and its affine."""

    image: np.ndarray
    affine: np.ndarray


@dataclass
class Done:
    """A segmented job."""

    job: Job
    result: CaseSegmentation
    seconds: float


@dataclass(frozen=True)
class SegmentationProtocol:
    """What a segmentation request is validated and decoded against.

    Attributes:
        channels: The model's channel order (``data.channels`` of its ``model.yaml``).
        spacing: The model's voxel spacing (mm), for the size after resampling.
        conventions: The label conventions of the model's task.
        default_convention: The task's convention when a request names none.
        limits: What requests may hold.
    """

    channels: tuple[str, ...]
    spacing: tuple[float, float, float]
    conventions: tuple[str, ...]
    default_convention: str
    limits: ServerLimits

    @classmethod
    def of(cls, segmenter: Segmenter, limits: ServerLimits) -> SegmentationProtocol:
        """The protocol of a loaded model under ``limits``."""
        task, data = segmenter.task, segmenter.cfg.data
        conventions = tuple(task.conventions)
        return cls(data.channels, data.spacing, conventions, task.default_convention, limits)

    # ------------------------------------------------------------ validation: request to jobs

    def validate_v2(self, request: InferRequest) -> Job:
        """The one validation of a v2 request (REST and gRPC): inputs, shapes, parameters.

        Raises:
            InputError: Naming the bad input or parameter.
        """
        if len(request.inputs) != 1:
            names = [i.name for i in request.inputs]
            raise InputError(f"expected one input, 'nifti' or 'image'; got {names}")
        inp = request.inputs[0]
        req_params = plain_params(request.parameters)
        params = self._with_convention(validate_params(req_params, plain_params(inp.parameters)))
        order = params.channel_order(self.channels)
        outputs = _wanted_outputs(request, params)
        shape = check_shape(inp.shape, f"input {inp.name!r}", self.limits)
        if inp.name == "nifti":
            if inp.datatype != "BYTES":
                raise InputError(f"input 'nifti': datatype must be BYTES, got {inp.datatype}")
            blobs = self._blobs(inp)
            if len(blobs) != math.prod(shape):
                raise InputError(f"input 'nifti': {len(blobs)} BYTES elements for shape {shape}")
            b64 = params.content_encoding == "base64"
            return Job("input 'nifti'", params, order, outputs, blobs=blobs, b64=b64)
        if inp.name == "image":
            shape = self._image_shape(inp, shape)
            return Job("input 'image'", params, order, outputs, tensor=inp, shape=shape)
        raise InputError(f"unknown input {inp.name!r}: send 'nifti' (BYTES) or 'image' (FP32/FP16)")

    def validate_v1(self, payload: Mapping[str, Any]) -> list[Job]:
        """The v1 form of :meth:`validate_v2`: each instance becomes a job.

        Raises:
            InputError: Naming the bad instance or parameter.
        """
        instances = payload.get("instances") if isinstance(payload, Mapping) else None
        if not isinstance(instances, list) or not instances:
            raise InputError("v1 request needs a non-empty 'instances' list")
        if len(instances) > _V1_INSTANCES:
            raise InputError(
                f"v1 request holds {len(instances)} instances; at most {_V1_INSTANCES}"
            )
        return [self._v1_job(inst, f"instance {n}") for n, inst in enumerate(instances)]

    def _v1_job(self, inst: Any, what: str) -> Job:
        """One v1 instance: ``nifti_b64`` (one 4D file) or ``modalities`` (one 3D file each)."""
        if not isinstance(inst, Mapping):
            raise InputError(f"{what} must be an object")
        params = self._with_convention(
            validate_params({k: inst[k] for k in ("label_convention", "channels") if k in inst})
        )
        if "nifti_b64" in inst:
            blobs = [_text(inst["nifti_b64"], f"{what} 'nifti_b64'")]
            order = params.channel_order(self.channels)
        elif isinstance(inst.get("modalities"), Mapping):
            mods = inst["modalities"]
            missing = [c for c in self.channels if c not in mods]
            if missing:
                raise InputError(f"{what} 'modalities' lacks {', '.join(missing)}")
            blobs = [_text(mods[c], f"{what} modality {c}") for c in self.channels]
            order = list(range(len(self.channels)))
        else:
            raise InputError(f"{what} needs 'nifti_b64' or 'modalities'")
        return Job(what, params, order, blobs=blobs, b64=True)

    def _with_convention(self, params: InferParams) -> InferParams:
        """``label_convention`` resolved against the model's task (its default when unset)."""
        return params.with_convention(self.conventions, self.default_convention)

    def _image_shape(self, inp: InferInput, shape: list[int]) -> list[int]:
        """The ``image`` tensor's ``[C, X, Y, Z]``, checked against the model and its data."""
        if inp.datatype not in _TENSOR_TYPES:
            raise InputError(f"input 'image': datatype must be FP32 or FP16, got {inp.datatype}")
        if len(shape) == 5 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != 4 or shape[0] != len(self.channels):
            raise InputError(
                f"input 'image': expected {len(self.channels)} channels of 3D volumes "
                f"([1, {len(self.channels)}, X, Y, Z]), got shape {list(inp.shape)}"
            )
        self._check_edges(shape[1:], "input 'image'")
        _check_tensor_size(inp, shape)
        return shape

    def _blobs(self, inp: InferInput) -> list[Any]:
        """The files of the ``nifti`` input: one 4D, or one 3D per channel."""
        raw = compat.raw_contents(inp)
        if raw is not None:  # gRPC raw_input_contents: our own framing check
            items: list[Any] = split_bytes_tensor(raw, "input 'nifti'")
        else:
            data = compat.values(inp)
            items = [] if data is None else list(np.asarray(data, dtype=np.object_).reshape(-1))
            if not all(isinstance(b, (bytes, bytearray, memoryview)) for b in items):
                raise InputError("input 'nifti': elements must be bytes")
        if len(items) not in (1, len(self.channels)):
            raise InputError(
                f"input 'nifti' holds {len(items)} files: send one 4D NIfTI or "
                f"{len(self.channels)} 3D ones"
            )
        return items

    def _check_edges(self, dims: list[int], what: str) -> None:
        if max(dims) > self.limits.max_edge:
            raise InputError(
                f"{what}: each edge must be at most max_edge={self.limits.max_edge} voxels, "
                f"got {dims}"
            )

    # ------------------------------------------------------------ decoding: job to case

    def decode(self, job: Job, budget: list[int]) -> Case:
        """The job's case, decoded within the limits, in the model's channel order.

        Args:
            job: The validated job.
            budget: ``[bytes]`` that decompression may still produce, shared by a request's
                cases.

        Raises:
            InputError: Naming the file or tensor that breaks a limit or does not decode.
        """
        if job.tensor is not None:
            arr = job.tensor.as_numpy().reshape(job.shape)
            affine = job.params.geometry(self.limits)
            image = arr if job.order == list(range(len(job.order))) else arr[job.order]
            return self._checked(Case(image, affine), job.what)
        assert job.blobs is not None
        if job.b64:
            job.blobs = [_b64(b, f"{job.what} file {i}") for i, b in enumerate(job.blobs)]
        if len(job.blobs) == 1:
            return self._checked(self._one_file(job, budget), job.what)
        return self._checked(self._files(job, budget), job.what)

    def _one_file(self, job: Job, budget: list[int]) -> Case:
        """A case from one 4D NIfTI."""
        assert job.blobs is not None
        n = len(self.channels)
        vol = decode_nifti(job.blobs[0], job.what, self.limits, budget=budget)
        if vol.data.ndim != 4 or vol.data.shape[-1] != n:
            raise InputError(
                f"{job.what}: one file must be a 4D image [X, Y, Z, {n}], "
                f"got shape {list(vol.data.shape)}; or send {n} 3D files"
            )
        image = np.moveaxis(vol.data, -1, 0)
        if job.order != list(range(len(job.order))):
            image = image[job.order]
        return Case(np.ascontiguousarray(image), vol.affine)

    def _files(self, job: Job, budget: list[int]) -> Case:
        """A case from one 3D NIfTI per channel (their voxels together within the limit)."""
        assert job.blobs is not None
        left = self.limits.max_case_voxels
        volumes = []
        for i, blob in enumerate(job.blobs):
            vol = decode_nifti(blob, f"{job.what} file {i}", self.limits, left, budget)
            left -= vol.data.size
            volumes.append(vol)
        shapes = {v.data.shape for v in volumes}
        if len(shapes) != 1 or volumes[0].data.ndim != 3:
            raise InputError(
                f"{job.what}: the {len(volumes)} files must be 3D volumes of one shape, got "
                f"{[list(v.data.shape) for v in volumes]}"
            )
        image = np.stack([volumes[i].data for i in job.order])
        return Case(image, volumes[job.order[0]].affine)

    def _checked(self, case: Case, what: str) -> Case:
        """``case``, once its edges, its size after resampling and its values pass."""
        self._check_edges(list(case.image.shape[1:]), what)
        check_resampled_size(
            case.image.shape[1:],
            case.affine,
            self.spacing,
            case.image.shape[0],
            what,
            self.limits,
        )
        if not np.isfinite(case.image).all():
            raise InputError(f"{what} contains NaN or Inf values")
        return case


# ------------------------------------------------------------ answers


def v2_response(
    model_name: str, request: InferRequest, done: Done, identity: Mapping[str, str]
) -> InferResponse:
    """The outputs the request names (all but ``probabilities`` when it names none)."""
    params, result = done.job.params, done.result
    wanted = done.job.outputs
    outputs = []
    label_map = result.label_map(params.label_convention)
    if "mask" in wanted:
        mask = encode_label_map(label_map, result.affine)
        outputs.append(infer_output("mask", "BYTES", [1], np.array([mask], dtype=np.object_)))
    if "volumes_ml" in wanted:
        names = list(result.volumes_ml)
        volumes = np.array([result.volumes_ml[r] for r in names], dtype=np.float32)
        regions = {"regions": ",".join(names)}
        outputs.append(infer_output("volumes_ml", "FP32", [len(names)], volumes, regions))
    if "labels" in wanted:
        convention = {"label_convention": params.label_convention}
        shape = list(label_map.shape)
        outputs.append(infer_output("labels", "UINT8", shape, label_map, convention))
    if "probabilities" in wanted:
        probs = result.probabilities.astype(np.float16)[None]
        outputs.append(infer_output("probabilities", "FP16", list(probs.shape), probs))
    return InferResponse(
        model_name=model_name,
        infer_outputs=outputs,
        response_id=request.id,
        parameters={
            "label_convention": params.label_convention,
            "compute_ms": round(done.seconds * 1000),
            **identity,
        },
        use_binary_outputs=True,
    )


def v1_predictions(done: list[Done], identity: Mapping[str, str]) -> dict[str, Any]:
    """The v1 answer: per instance, its base64 mask, convention, volumes and compute time."""
    predictions = []
    for d in done:
        convention = d.job.params.label_convention
        mask = encode_label_map(d.result.label_map(convention), d.result.affine)
        predictions.append(
            {
                "mask_b64": base64.b64encode(mask).decode(),
                "label_convention": convention,
                "volumes_ml": d.result.volumes_ml,
                "compute_ms": round(d.seconds * 1000),
                **identity,
            }
        )
    return {"predictions": predictions}


def infer_output(
    name: str,
    datatype: str,
    shape: list[int],
    data: np.ndarray,
    params: dict[str, Any] | None = None,
) -> InferOutput:
    """A binary output tensor of ``data``."""
    out = InferOutput(name=name, shape=shape, datatype=datatype, parameters=params)
    out.set_data_from_numpy(data, binary_data=True)
    return out


def _wanted_outputs(request: InferRequest, params: InferParams) -> frozenset[str]:
    """The outputs to answer: those named (known ones only), else all but ``probabilities``.

    Raises:
        InputError: For an unknown output name.
    """
    named = [o.name for o in request.request_outputs or []]
    unknown = sorted(set(named) - set(OUTPUTS))
    if unknown:
        raise InputError(
            f"unknown output(s) requested: {', '.join(unknown)}; the model answers "
            f"{', '.join(OUTPUTS)}"
        )
    if named:
        return frozenset(named)
    return frozenset(n for n in OUTPUTS if n != "probabilities" or params.probabilities)


def _check_tensor_size(inp: InferInput, shape: list[int]) -> None:
    """The tensor's data hold exactly its shape (gRPC does not check this for us)."""
    count = math.prod(shape)
    raw = compat.raw_contents(inp)
    if raw is not None:
        itemsize = np.dtype(_TENSOR_TYPES[inp.datatype]).itemsize
        if len(memoryview(raw).cast("B")) != count * itemsize:
            raise InputError(
                f"input 'image': {len(raw)} bytes do not hold {inp.datatype} of shape "
                f"{list(inp.shape)} ({count * itemsize} bytes)"
            )
        return
    data = compat.values(inp)
    size = np.size(data) if isinstance(data, np.ndarray) else len(data or [])
    if size != count:
        raise InputError(f"input 'image': {size} values for shape {list(inp.shape)}")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{what} must be a base64 string")
    return value


def _b64(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    if not isinstance(value, str):
        raise InputError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise InputError(f"{what} is not valid base64") from None
