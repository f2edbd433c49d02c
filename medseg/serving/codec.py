"""The one codec of the model server and its client: NIfTI, OIP v2 tensors and bodies, parameters.

Shared by the server (:mod:`model_server`) and the client (:mod:`medseg.serving.client`), both ways.

Everything here treats its input as hostile: sizes come from headers that may lie, gzip streams
may inflate a thousandfold, parameters may have any JSON type. Each check runs before the memory
it protects is allocated, and every refusal is an :class:`~medseg.core.errors.InputError`
whose message names the input, the problem and, for a size, the
:class:`~medseg.core.settings.ServerLimits` field it exceeds.

* :func:`decode_nifti` is the bounded mode of :func:`medseg.io.nifti.decode`: it reads the NIfTI
  header first (dims × datatype against ``max_case_voxels``, datatype scalar, affine finite),
  then inflates exactly the voxel bytes the header announces, never more than
  :attr:`ServerLimits.max_decoded_bytes` in total;
* :func:`check_resampled_size` bounds the case's size after resampling to the model's spacing;
* :func:`split_bytes_tensor` / :func:`serialize_bytes` are the OIP BYTES framing (uint32 LE
  length before each element);
* :func:`validate_params` is the one validation of request parameters (types and ranges);
  :func:`check_strings` bounds the request id and every parameter's name and string value
  (``max_param_chars``) before anything echoes or keeps them;
* :func:`encode_v2_body` / :func:`split_v2_body` are the binary tensor data extension's framing
  (a JSON part of :data:`HEADER_LENGTH` bytes, then each binary tensor's bytes in order), and
  :func:`tensor_view` reads a tensor's raw bytes as an array, without a copy;
* :func:`split_grpc_raw` / :func:`join_grpc_raw` are the gRPC ``ModelInferRequest`` /
  ``ModelInferResponse`` wire framing of their ``raw_*_contents`` (a repeated ``bytes`` field):
  the tensors are viewed in the received message and written after the rest, never copied into
  or out of a protobuf object (protobuf's Python messages copy a ``bytes`` field on every
  access, and ``ByteSize`` serialises the whole message).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from medseg.core.errors import InputError
from medseg.core.settings import ServerLimits
from medseg.io.nifti import Volume, decode, format_shape
from medseg.tasks import get_task as _get_task
from medseg.tasks import known_tasks

__all__ = [
    "CHANNEL_ALIASES",
    "HEADER_LENGTH",
    "OIP_DTYPES",
    "InferParams",
    "check_placement",
    "check_resampled_size",
    "check_shape",
    "check_strings",
    "decode_nifti",
    "encode_v2_body",
    "join_grpc_raw",
    "serialize_bytes",
    "split_bytes_tensor",
    "split_grpc_raw",
    "split_v2_body",
    "tensor_view",
    "validate_params",
]

#: The binary tensor data extension's header naming the JSON part's length (lower case).
HEADER_LENGTH = "inference-header-content-length"
#: numpy types of the OIP datatypes with fixed-size elements.
OIP_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(t)
    for name, t in {
        "BOOL": np.bool_,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }.items()
}

#: Other names of the modalities (BraTS 2021 file suffixes, BraTS 2023 names).
CHANNEL_ALIASES = {"t1ce": "t1gd", "t1c": "t1gd", "t2f": "flair", "t1n": "t1", "t2w": "t2"}


# ---------------------------------------------------------------- NIfTI


def decode_nifti(
    data: bytes | memoryview,
    what: str,
    limits: ServerLimits,
    voxels_left: int | None = None,
    budget: list[int] | None = None,
) -> Volume:
    """Voxels (float32) and grid of NIfTI-1/2 bytes, gzipped or not, read within limits.

    The bounded mode of :func:`medseg.io.nifti.decode`, the one NIfTI reader.

    Args:
        data: The file's bytes.
        what: How messages name this file (``input 'nifti' file 2``).
        limits: The server's limits.
        voxels_left: Voxels the case may still hold (default ``limits.max_case_voxels``).
        budget: ``[bytes]`` that decompression may still produce, shared by a request's files
            (default ``limits.max_decoded_bytes``).

    Raises:
        InputError: If the bytes are not a readable single-file NIfTI with a scalar datatype,
            or announce more voxels than allowed, or are shorter than their header says.
    """
    return decode(data, what, limits=limits, voxels_left=voxels_left, budget=budget)


# ---------------------------------------------------------------- sizes


def check_shape(shape: Sequence[Any], what: str, limits: ServerLimits) -> list[int]:
    """A tensor shape as Python ints, each ≥ 1, whose product is within ``max_case_voxels``.

    Raises:
        InputError: For a non-integer, non-positive or too large shape.
    """
    dims = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise InputError(f"{what}: shape {list(shape)} must be positive integers")
        dims.append(int(d))
    if math.prod(dims) > limits.max_case_voxels:
        raise InputError(
            f"{what}: shape {format_shape(dims)} holds {math.prod(dims)} values, above "
            f"max_case_voxels={limits.max_case_voxels}"
        )
    return dims


def check_placement(
    shape: Sequence[int], affine: np.ndarray, what: str, limits: ServerLimits
) -> None:
    """Refuse a grid that cannot be placed in the scanner's space.

    Its affine must be finite and not singular, and each corner of its ``shape[:3]`` voxels must
    lie within ``max_position_mm`` of the origin on every axis. The transforms resample in
    float32, whose 24-bit mantissa cannot tell voxels apart at a position of 1e30 mm (the
    foreground crop is then empty, and the case would be answered as an empty mask).

    Raises:
        InputError: Naming the corner's position and the limit.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise InputError(f"{what}: the voxel-to-world affine is not a finite 4×4 matrix")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise InputError(f"{what}: the voxel-to-world affine is singular")
    edges = [(0, max(int(n) - 1, 0)) for n in shape[:3]]
    corners = np.array([[i, j, k, 1.0] for i in edges[0] for j in edges[1] for k in edges[2]])
    world = corners @ a[:3].T
    far = float(np.abs(world).max())
    if far > limits.max_position_mm:
        raise InputError(
            f"{what}: the grid reaches {far:.6g} mm from the scanner's origin, beyond "
            f"max_position_mm={limits.max_position_mm:g} (a position that cannot be placed)"
        )


def check_resampled_size(
    shape: Sequence[int],
    affine: np.ndarray,
    target_spacing: Sequence[float],
    channels: int,
    what: str,
    limits: ServerLimits,
) -> None:
    """Refuse a case whose voxels, resampled to ``target_spacing``, exceed the limits.

    The spacing of each axis (the affine's column norms, as MONAI's ``Spacing`` reads it) must lie
    in ``[min_spacing_mm, max_spacing_mm]``; every corner of the grid must lie within
    ``max_position_mm`` of the scanner's origin (:func:`check_placement`); the resampled grid
    (directions kept, spacing changed) must hold at most ``max_resampled_voxels`` over all
    channels.

    Raises:
        InputError: Naming the limit.
    """
    check_placement(shape, affine, what, limits)
    zooms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    if (
        not np.isfinite(zooms).all()
        or (zooms < limits.min_spacing_mm).any()
        or (zooms > limits.max_spacing_mm).any()
    ):
        raise InputError(
            f"{what}: voxel spacing {[float(f'{z:.6g}') for z in zooms]} mm is outside "
            f"min_spacing_mm={limits.min_spacing_mm}..max_spacing_mm={limits.max_spacing_mm}"
        )
    out = [
        max(1, round((n - 1) * z / t) + 1)
        for n, z, t in zip(shape[:3], zooms, target_spacing, strict=True)
    ]
    total = math.prod(out) * channels
    if total > limits.max_resampled_voxels:
        raise InputError(
            f"{what}: {format_shape(shape[:3])} voxels at {[float(f'{z:.6g}') for z in zooms]} mm "
            f"resample to {format_shape(out)}×{channels} = {total} voxels at the model's spacing "
            f"{list(target_spacing)} mm, above max_resampled_voxels={limits.max_resampled_voxels}"
        )


# ---------------------------------------------------------------- BYTES framing


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """The OIP binary form of a BYTES tensor: each element prefixed by its uint32 LE length."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def split_bytes_tensor(raw: bytes | memoryview, what: str, max_items: int = 64) -> list[memoryview]:
    """The elements of a binary BYTES tensor, as views (no copy).

    Raises:
        InputError: If a length prefix runs past the end, or there are more than ``max_items``.
    """
    view = memoryview(raw).cast("B")
    items: list[memoryview] = []
    pos = 0
    while pos < len(view):
        if pos + 4 > len(view):
            raise InputError(f"{what}: BYTES framing ends inside a length prefix")
        (n,) = struct.unpack_from("<I", view, pos)
        if pos + 4 + n > len(view):
            raise InputError(
                f"{what}: BYTES element {len(items)} announces {n} bytes, "
                f"{len(view) - pos - 4} are left"
            )
        items.append(view[pos + 4 : pos + 4 + n])
        pos += 4 + n
        if len(items) > max_items:
            raise InputError(f"{what}: more than {max_items} BYTES elements")
    return items


# ---------------------------------------------------------------- OIP v2 binary bodies


def tensor_view(
    raw: bytes | bytearray | memoryview, datatype: str, shape: Sequence[int], what: str
) -> np.ndarray:
    """A fixed-size tensor's raw bytes (little-endian, C order) as an array, without a copy.

    Raises:
        InputError: For a BYTES or unknown datatype, or bytes that do not hold the shape.
    """
    dtype = OIP_DTYPES.get(datatype)
    if dtype is None:
        raise InputError(f"{what}: datatype {datatype!r} is not a fixed-size OIP type")
    count = math.prod(int(d) for d in shape)
    view = memoryview(raw).cast("B")
    if len(view) != count * dtype.itemsize:
        raise InputError(
            f"{what}: {len(view)} bytes do not hold {datatype} of shape {list(shape)} "
            f"({count * dtype.itemsize} bytes)"
        )
    return np.frombuffer(view, dtype=dtype.newbyteorder("<")).reshape(shape)


def encode_v2_body(
    doc: dict[str, Any],
    key: str,
    tensors: Sequence[tuple[dict[str, Any], bytes | memoryview | None]],
) -> tuple[list[bytes | memoryview], dict[str, str]]:
    """A v2 body: the JSON part, then each binary tensor's bytes (not joined).

    Args:
        doc: The JSON part, but for its tensors.
        key: Where the tensors go in ``doc``: ``inputs`` (a request) or ``outputs`` (a response).
        tensors: ``(entry, raw)`` per tensor, in order: with ``raw``, the entry gets
            ``binary_data_size`` and the bytes follow the JSON part; without, it is JSON only.

    Returns:
        The body's parts, to send one after the other (a 136 MiB tensor is never copied), and
        the headers (``Content-Type``, ``Content-Length``, and :data:`HEADER_LENGTH` when there
        are binary parts).
    """
    entries, chunks = [], []
    for entry, raw in tensors:
        if raw is not None:
            entry = {
                **entry,
                "parameters": {**(entry.get("parameters") or {}), "binary_data_size": len(raw)},
            }
            chunks.append(raw)
        entries.append(entry)
    head = orjson.dumps({**doc, key: entries}, option=orjson.OPT_SERIALIZE_NUMPY)
    parts: list[bytes | memoryview] = [head, *chunks]
    headers = {"content-length": str(sum(len(p) for p in parts))}
    if not chunks:
        return parts, {"content-type": "application/json", **headers}
    return parts, {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(head)),
        **headers,
    }


def split_v2_body(
    body: bytes | bytearray | memoryview, json_length: int | None, key: str, what: str
) -> tuple[dict[str, Any], dict[str, memoryview]]:
    """The JSON part of a v2 body and its binary tensors (views into ``body``), by name.

    Args:
        body: The whole body.
        json_length: The :data:`HEADER_LENGTH` header (None: the body is JSON only).
        key: ``inputs`` (a request) or ``outputs`` (a response).
        what: How messages name the body.

    Raises:
        InputError: For malformed JSON or binary sizes that do not add up to the body.
    """
    view = memoryview(body).cast("B")
    json_length = len(view) if json_length is None else json_length
    if not 0 < json_length <= len(view):
        raise InputError(f"{what}: {HEADER_LENGTH} is {json_length}, the body has {len(view)}")
    try:
        doc = orjson.loads(view[:json_length])
    except orjson.JSONDecodeError as exc:
        raise InputError(f"{what}: malformed JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(key, []), list):
        raise InputError(f"{what}: not a JSON object with a list of {key}")
    offset, binary = json_length, {}
    for entry in doc.get(key, []):
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(view):
            raise InputError(f"{what}: {entry.get('name')!r} binary_data_size {size!r} is wrong")
        binary[str(entry.get("name"))] = view[offset : offset + size]
        offset += size
    if offset != len(view):
        raise InputError(f"{what}: {len(view) - offset} bytes after the last binary tensor")
    return doc, binary


# ---------------------------------------------------------------- parameters


def _split(value: Any) -> Any:
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else value


class InferParams(BaseModel):
    """Request parameters, validated by type (and the ranges that need no settings).

    Attributes:
        label_convention: Convention of the returned label map; ``None``: the model's task's
            default (BraTS: ``brats2021``), filled in by the server (:meth:`with_convention`).
        probabilities: Also answer the probabilities.
        binary_data_output: Answer every output as binary data (REST).
        binary_data: Answer this output as binary data (a requested output's parameter).
        channels: The inputs' modality order (names or aliases, comma-separated or a list).
        spacing: Voxel spacing of a raw tensor, mm (3 numbers).
        affine: Voxel-to-world affine of a raw tensor (16 numbers, row-major).
        content_encoding: ``base64`` when BYTES elements travel inside JSON.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    label_convention: str | None = None
    probabilities: bool = False
    binary_data_output: bool | None = None
    binary_data: bool | None = None
    channels: tuple[str, ...] | None = None
    spacing: tuple[float, float, float] | None = None
    affine: tuple[float, ...] | None = None
    content_encoding: str | None = None

    @field_validator("label_convention", "content_encoding", mode="before")
    @classmethod
    def _strict_str(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise ValueError("must be a string")
        return value

    @field_validator("label_convention")
    @classmethod
    def _known_convention(cls, value: str | None) -> str | None:
        known = [c for t in known_tasks() for c in _get_task(t).conventions]
        if value is not None and value not in known:
            raise ValueError(f"unknown label_convention; use one of {', '.join(known)}")
        return value

    def with_convention(self, conventions: Sequence[str], default: str) -> InferParams:
        """These parameters with ``label_convention`` one of the model's (``default`` if none).

        Raises:
            InputError: If the request names a convention the model's task does not write.
        """
        chosen = self.label_convention or default
        if chosen not in conventions:
            raise InputError(
                f"parameter 'label_convention': {chosen!r} is not a convention of this model; "
                f"use one of {', '.join(conventions)}"
            )
        return self.model_copy(update={"label_convention": chosen})

    @field_validator("content_encoding")
    @classmethod
    def _base64_only(cls, value: str | None) -> str | None:
        if value not in (None, "base64"):
            raise ValueError("only 'base64' is supported")
        return value

    @field_validator("channels", mode="before")
    @classmethod
    def _channel_names(cls, value: Any) -> Any:
        value = _split(value)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError("must be modality names, comma-separated or a list of strings")
        names = [CHANNEL_ALIASES.get(v.strip().lower(), v.strip().lower()) for v in value]
        return tuple(names)

    @field_validator("spacing", "affine", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        value = _split(value)
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value
        ):
            raise ValueError("must be numbers, comma-separated or a list")
        return value

    @field_validator("affine")
    @classmethod
    def _sixteen(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and len(value) != 16:
            raise ValueError("must be 16 numbers (a 4×4 matrix, row-major)")
        return value

    def channel_order(self, model_channels: Sequence[str]) -> list[int]:
        """Index, in the request's order, of each of the model's channels.

        Raises:
            InputError: If ``channels`` does not name each of the model's channels once.
        """
        names = list(self.channels or model_channels)
        if sorted(names) != sorted(model_channels):
            raise InputError(
                f"parameter 'channels' must name {', '.join(model_channels)} once each; "
                f"got {', '.join(names)}"
            )
        return [names.index(c) for c in model_channels]

    def geometry(self, limits: ServerLimits) -> np.ndarray:
        """The raw tensor's affine: from ``affine``, else ``spacing`` (identity directions).

        Raises:
            InputError: If the affine is singular or the spacing out of range.
        """
        if self.affine is not None:
            affine = np.asarray(self.affine, dtype=np.float64).reshape(4, 4)
            if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
                raise InputError("parameter 'affine' is singular")
            return affine
        spacing = np.asarray(self.spacing or (1.0, 1.0, 1.0), dtype=np.float64)
        if ((spacing < limits.min_spacing_mm) | (spacing > limits.max_spacing_mm)).any():
            raise InputError(
                f"parameter 'spacing' {spacing.tolist()} must lie in "
                f"min_spacing_mm={limits.min_spacing_mm}..max_spacing_mm={limits.max_spacing_mm}"
            )
        return np.diag([*spacing, 1.0])


def validate_params(*layers: Mapping[str, Any] | None) -> InferParams:
    """The one validation of request parameters: later layers (an input's own) win.

    Args:
        layers: Plain parameter maps (request level first, then input level).

    Raises:
        InputError: Naming the first bad parameter, what it must be and what it was.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        if not isinstance(layer, Mapping):
            raise InputError(f"'parameters' must be an object, got {type(layer).__name__}")
        merged.update(layer)
    try:
        return InferParams.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"][:1]) or "parameters"
        got = repr(merged.get(str(err["loc"][0])) if err["loc"] else merged)
        got = got if len(got) <= 80 else got[:77] + "..."
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise InputError(f"parameter {name!r}: {msg} (got {got})") from None


def check_strings(value: Any, what: str, limits: ServerLimits) -> None:
    """Refuse a string, or a name or string inside ``value``, of more than ``max_param_chars``.

    For request ids and parameter maps (REST values or gRPC ``InferParameter`` choices, read as
    plain values), checked before they are echoed back or kept.

    Raises:
        InputError: Naming where the string is and the limit.
    """
    limit = limits.max_param_chars
    stack: list[tuple[Any, str]] = [(value, what)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, (str, bytes)):
            if len(item) > limit:
                raise InputError(
                    f"{where} holds {len(item)} characters, above max_param_chars={limit}"
                )
        elif isinstance(item, Mapping):
            for key, sub in item.items():
                if isinstance(key, str) and len(key) > limit:
                    raise InputError(
                        f"{where}: a parameter name of {len(key)} characters, above "
                        f"max_param_chars={limit}"
                    )
                stack.append((sub, f"{where} {str(key)[:40]!r}"))
        elif isinstance(item, (list, tuple)):
            stack.extend((sub, where) for sub in item)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: memoryview, pos: int, what: str) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise InputError(f"{what}: truncated or overlong varint at byte {pos}")


#: Protobuf wire types (varint, 64-bit, length-delimited, 32-bit) and the fixed sizes.
_FIXED = {1: 8, 5: 4}


def split_grpc_raw(
    message: bytes | memoryview, field: int, what: str
) -> tuple[bytes, list[memoryview]]:
    """A serialised protobuf message without its ``bytes`` field ``field``, and that field's values.

    The values are views into ``message`` (no copy); the rest (a few hundred bytes of names,
    shapes and parameters) is returned as its own message, for protobuf to parse.

    Args:
        message: The serialised message (e.g. a ``ModelInferRequest``).
        field: The field number of the repeated ``bytes`` field (7: ``raw_input_contents``).
        what: The message, named in errors.

    Raises:
        InputError: If the message is not well-formed protobuf at its top level.
    """
    data = memoryview(message).cast("B")
    rest: list[memoryview] = []
    raws: list[memoryview] = []
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos, what)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(data, pos, what)
        elif wire in _FIXED:
            pos += _FIXED[wire]
        elif wire == 2:
            length, pos = _read_varint(data, pos, what)
            if number == field:
                if pos + length > len(data):
                    raise InputError(
                        f"{what}: field {field} of {length} bytes runs past the message's end"
                    )
                raws.append(data[pos : pos + length])
                pos += length
                continue
            pos += length
        else:
            raise InputError(f"{what}: unsupported wire type {wire} at byte {start}")
        if pos > len(data):
            raise InputError(f"{what}: field {number} runs past the message's end")
        rest.append(data[start:pos])
    return b"".join(rest), raws


def join_grpc_raw(head: bytes, field: int, raws: Sequence[bytes | memoryview]) -> bytes:
    """``head`` (a serialised message without field ``field``) with ``raws`` as that field.

    Protobuf messages concatenate: the result parses as ``head`` with ``raws`` appended to the
    repeated ``bytes`` field ``field``. The one copy is the join (gRPC sends one ``bytes``).
    """
    key = _varint(field << 3 | 2)
    parts: list[bytes | memoryview] = [head]
    for raw in raws:
        parts += [key, _varint(memoryview(raw).nbytes), raw]
    return b"".join(parts)
