"""The predictor's protocol for a classification task (a skin-lesion classifier).

The same KServe predictor (:class:`model_server.predictor.MedsegPredictor`) serves a model whose
task classifies (``outputs.kind == "classes"``) through these functions: the slots, tickets,
stage timing and model identity stay the predictor's.

Open Inference Protocol v2 (REST and gRPC), one input ``image``, several images per request:

* BYTES ``[N]``: JPEG or PNG files (base64 strings in a JSON body with the input parameter
  ``content_encoding: base64``);
* UINT8 or FP32 ``[N, 3, H, W]``: RGB pixels (0–255), channels first.

Outputs: ``probabilities`` FP32 ``[N, C]`` (parameter ``classes``: the class order), ``label``
BYTES ``[N]`` (the most probable class) and ``top_k`` BYTES ``[N, k]`` (the ``k`` most probable
classes, most probable first; request parameter ``top_k``, default 3). REST v1 ``:predict``
takes ``{"instances": [{"image_b64": …}, …]}`` (or ``{"image": {"b64": …}}``) and answers, per
image, ``class``, ``class_name``, ``probability`` and ``probabilities``: the seed endpoint's
"class: basal cell carcinoma, probability: 92 %".

Decoding is bounded (:func:`medseg.io.images.decode_image`): the headers are read first, and
the request's images together may hold at most ``max_image_pixels`` pixels (a decompression
bomb or a JPEG that claims 60000×60000 is refused before any pixel is decoded); a tensor's
``N·H·W`` obeys the same budget.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.core.errors import InputError
from medseg.core.settings import ServerLimits
from medseg.io.images import decode_image
from medseg.serving.codec import check_shape, split_bytes_tensor

__all__ = [
    "CLASS_OUTPUTS",
    "MAX_IMAGES",
    "ImageJob",
    "decode_images",
    "v1_jobs",
    "v1_predictions",
    "v2_job",
    "v2_outputs",
]

#: A classifier's outputs and their datatypes.
CLASS_OUTPUTS = {"probabilities": "FP32", "label": "BYTES", "top_k": "BYTES"}
#: Images one request may hold.
MAX_IMAGES = 256
_TENSORS = {"UINT8": np.uint8, "FP32": np.float32}


@dataclass
class ImageJob:
    """A validated request of ``N`` images, not yet decoded."""

    what: str
    files: list[Any] | None = None
    b64: bool = False
    tensor: np.ndarray | None = None
    outputs: frozenset[str] = frozenset(CLASS_OUTPUTS)
    top_k: int = 3


def _top_k(params: Mapping[str, Any] | None, classes: int) -> int:
    raw = (params or {}).get("top_k", 3)
    try:
        k = int(raw)
    except (TypeError, ValueError):
        raise InputError(f"parameter 'top_k' must be an integer, got {raw!r}") from None
    if not 1 <= k <= classes:
        raise InputError(f"parameter 'top_k' must be in [1, {classes}], got {k}")
    return k


def _outputs(named: Sequence[str]) -> frozenset[str]:
    unknown = sorted(set(named) - set(CLASS_OUTPUTS))
    if unknown:
        raise InputError(
            f"unknown output(s) requested: {', '.join(unknown)}; the model answers "
            f"{', '.join(CLASS_OUTPUTS)}"
        )
    return frozenset(named or CLASS_OUTPUTS)


def _tensor(
    inp: Any, shape: list[int], raw: Any | None, limits: ServerLimits, channels: int
) -> np.ndarray:
    if inp.datatype not in _TENSORS:
        raise InputError(
            f"input 'image': datatype must be BYTES, UINT8 or FP32, got {inp.datatype}"
        )
    if len(shape) != 4 or shape[1] != channels:
        raise InputError(f"input 'image': expected [N, {channels}, H, W], got shape {shape}")
    if max(shape[2:]) > limits.max_image_edge:
        raise InputError(f"input 'image': edges must be at most {limits.max_image_edge}: {shape}")
    if shape[0] * shape[2] * shape[3] > limits.max_image_pixels:
        raise InputError(
            f"input 'image': {shape[0]}×{shape[2]}×{shape[3]} pixels; a request may hold "
            f"max_image_pixels={limits.max_image_pixels}"
        )
    dtype = np.dtype(_TENSORS[inp.datatype])
    if raw is not None:
        buf = memoryview(raw).cast("B")
        if len(buf) != math.prod(shape) * dtype.itemsize:
            raise InputError(f"input 'image': {len(buf)} bytes do not hold {inp.datatype} {shape}")
        arr = np.frombuffer(buf, dtype=dtype)
    else:
        arr = np.asarray(getattr(inp, "_data", None) or [], dtype=dtype).reshape(-1)
        if arr.size != math.prod(shape):
            raise InputError(f"input 'image': {arr.size} values for shape {shape}")
    arr = arr.reshape(shape)
    if dtype == np.float32 and not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 255):
        raise InputError("input 'image': FP32 pixels must be finite, in [0, 255]")
    return arr


def v2_job(request: Any, raw: Any | None, limits: ServerLimits, classes: int) -> ImageJob:
    """The one validation of a v2 request for a classifier (REST and gRPC).

    Args:
        request: kserve's ``InferRequest``.
        raw: The input's binary contents, if it came as such (see ``compat.raw_contents``).
        limits: The server's limits.
        classes: The model's number of classes.

    Raises:
        InputError: Naming the bad input, shape, datatype or parameter.
    """
    if len(request.inputs) != 1 or request.inputs[0].name != "image":
        names = [i.name for i in request.inputs]
        raise InputError(f"expected one input 'image' (BYTES, UINT8 or FP32); got {names}")
    inp = request.inputs[0]
    params = {**(request.parameters or {}), **(inp.parameters or {})}
    params = {
        k: getattr(v, v.WhichOneof("parameter_choice")) if hasattr(v, "WhichOneof") else v
        for k, v in params.items()
    }
    outputs = _outputs([o.name for o in request.request_outputs or []])
    k = _top_k(params, classes)
    shape = check_shape(inp.shape, "input 'image'", limits)
    if inp.datatype != "BYTES":
        return ImageJob(
            "input 'image'", tensor=_tensor(inp, shape, raw, limits, 3), outputs=outputs, top_k=k
        )
    if raw is not None:
        files: list[Any] = split_bytes_tensor(raw, "input 'image'")
    else:
        data = getattr(inp, "_data", None)
        files = [] if data is None else list(np.asarray(data, dtype=np.object_).reshape(-1))
    if len(files) != math.prod(shape) or len(shape) != 1:
        raise InputError(f"input 'image': {len(files)} BYTES elements for shape {shape} (want [N])")
    if not 1 <= len(files) <= MAX_IMAGES:
        raise InputError(f"input 'image': 1 to {MAX_IMAGES} images per request, got {len(files)}")
    b64 = params.get("content_encoding") == "base64"
    return ImageJob("input 'image'", files=files, b64=b64, outputs=outputs, top_k=k)


def v1_jobs(payload: Mapping[str, Any]) -> ImageJob:
    """A v1 ``{"instances": [{"image_b64": …}]}`` request as one job of base64 files.

    Raises:
        InputError: Naming the bad instance.
    """
    instances = payload.get("instances") if isinstance(payload, Mapping) else None
    if not isinstance(instances, list) or not instances:
        raise InputError("v1 request needs a non-empty 'instances' list")
    if len(instances) > MAX_IMAGES:
        raise InputError(f"v1 request holds {len(instances)} instances; at most {MAX_IMAGES}")
    files = []
    for n, inst in enumerate(instances):
        value = inst.get("image_b64") if isinstance(inst, Mapping) else None
        if value is None and isinstance(inst, Mapping) and isinstance(inst.get("image"), Mapping):
            value = inst["image"].get("b64")
        if not isinstance(value, str):
            raise InputError(f"instance {n} needs 'image_b64' (or 'image': {{'b64': …}}), a string")
        files.append(value)
    return ImageJob("instance", files=files, b64=True)


def _unbase64(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        raise InputError(f"{what} is not valid base64") from None


def decode_images(job: ImageJob, limits: ServerLimits) -> list[np.ndarray]:
    """The job's images as RGB ``[3, H, W]`` arrays, within the request's pixel budget.

    Raises:
        InputError: Naming the image that is not a JPEG/PNG, is corrupt, or breaks a limit.
    """
    if job.tensor is not None:
        return [np.clip(img, 0, 255).astype(np.uint8) for img in job.tensor]
    assert job.files is not None
    left = limits.max_image_pixels
    images = []
    for i, blob in enumerate(job.files):
        what = f"{job.what} {i}" if job.what == "instance" else f"{job.what} element {i}"
        data = _unbase64(blob, what) if job.b64 else blob
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InputError(f"{what} must be bytes")
        img = decode_image(bytes(data), what, limits, pixels_left=left)
        left -= img.shape[1] * img.shape[2]
        images.append(img)
    return images


def v2_outputs(
    probabilities: np.ndarray, classes: Sequence[str], job: ImageJob
) -> list[tuple[str, str, list[int], np.ndarray, dict[str, Any] | None]]:
    """``(name, datatype, shape, data, parameters)`` of each output the job asks for."""
    n = len(probabilities)
    order = np.argsort(-probabilities, axis=1, kind="stable")
    out: list[tuple[str, str, list[int], np.ndarray, dict[str, Any] | None]] = []
    if "probabilities" in job.outputs:
        probs = probabilities.astype(np.float32)
        out.append(
            ("probabilities", "FP32", [n, len(classes)], probs, {"classes": ",".join(classes)})
        )
    if "label" in job.outputs:
        labels = np.array([classes[r[0]].encode() for r in order], dtype=np.object_)
        out.append(("label", "BYTES", [n], labels, None))
    if "top_k" in job.outputs:
        top = np.array(
            [[classes[c].encode() for c in r[: job.top_k]] for r in order], dtype=np.object_
        )
        out.append(("top_k", "BYTES", [n, job.top_k], top, None))
    return out


def v1_predictions(
    probabilities: np.ndarray,
    classes: Sequence[str],
    names: Mapping[str, str],
    identity: Mapping[str, str],
) -> dict[str, Any]:
    """The v1 answer: per image its class, the class's name, probability and all of them."""
    predictions = []
    for row in probabilities:
        best = int(np.argmax(row))
        predictions.append(
            {
                "class": classes[best],
                "class_name": names.get(classes[best], classes[best]),
                "probability": float(row[best]),
                "probabilities": {c: float(p) for c, p in zip(classes, row, strict=True)},
                **identity,
            }
        )
    return {"predictions": predictions}
