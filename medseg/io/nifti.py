"""The NIfTI codec of the library: bytes to voxels with their grid, and label maps to bytes.

:func:`decode` is the one NIfTI reader: batch prediction and evaluation read every raw volume and
label map through it, and the model server (:func:`medseg.serving.codec.decode_nifti`) through its
bounded mode. Bounded, it treats its input as hostile: the header is read first (dims ×
datatype against ``max_case_voxels``, datatype scalar, affine finite), then exactly the voxel
bytes the header announces are inflated, never more than ``max_decoded_bytes`` in total, so a
gzip bomb or a lying header costs no memory. Every label map written goes through
:func:`encode_label_map`. A failure names the file and the reason
(:class:`~medseg.core.errors.InputError`), never a traceback.
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from medseg.core.errors import InputError, MedsegError
from medseg.core.settings import ServerLimits

__all__ = [
    "GZIP_MAGIC",
    "Volume",
    "decode",
    "encode_label_map",
    "format_shape",
    "inflate",
    "open_image",
    "read_voxels",
]

#: The first two bytes of a gzip stream.
GZIP_MAGIC = b"\x1f\x8b"
#: What :func:`open_image` returns.
Image = nib.Nifti1Image | nib.Nifti2Image
_CHUNK = 1 << 16  # compressed bytes fed to zlib at a time: its unconsumed tail stays small
#: ``sizeof_hdr`` → header class, image class and the magic of a single-file image.
_KINDS = {
    348: (nib.Nifti1Header, nib.Nifti1Image, b"n+1"),
    540: (nib.Nifti2Header, nib.Nifti2Image, b"n+2"),
}


@dataclass
class Volume:
    """Decoded voxels and the grid they lie on.

    Attributes:
        data: The voxels ``[X, Y, Z(, C)]`` (float32 for images, as stored for :func:`decode`
            with ``dtype=None``).
        affine: ``4×4`` voxel-to-world affine in mm.
        zooms: Voxel size along each array axis, in mm.
    """

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, ...]


def format_shape(shape: Sequence[int]) -> str:
    """A shape as messages write it: ``240×240×155``."""
    return "×".join(str(int(s)) for s in shape)


class _Stream:
    """Sequential reads from in-memory bytes, gzipped or not, with an optional output bound."""

    def __init__(self, data: bytes | memoryview, what: str, budget: list[int] | None = None):
        self._view = memoryview(data).cast("B")
        self._pos = 0
        self._budget = budget  # [bytes left], shared by the files of one request; None: unbounded
        self._what = what
        gzipped = bytes(self._view[:2]) == GZIP_MAGIC
        self._inflate = zlib.decompressobj(wbits=31) if gzipped else None
        self._pending = b""

    @property
    def complete(self) -> bool:
        """Whether the data is not gzip, or its last gzip member ended with its end marker."""
        return self._inflate is None or self._inflate.eof

    def _spend(self, n: int) -> None:
        if self._budget is None:
            return
        if n > self._budget[0]:
            raise InputError(
                f"{self._what} decompresses to more than the request may "
                f"(max_decoded_bytes, from max_case_voxels and max_request_mb)"
            )
        self._budget[0] -= n

    def read(self, n: int) -> bytes | bytearray | memoryview:
        """Up to ``n`` bytes (fewer only at the end of the data)."""
        self._spend(n)
        if self._inflate is None:
            out = self._view[self._pos : self._pos + n]
            self._pos += len(out)
            return out
        buf = bytearray()
        try:
            while len(buf) < n:
                if self._pending:
                    src: bytes | memoryview = self._pending
                elif self._pos < len(self._view):
                    src = self._view[self._pos : self._pos + _CHUNK]
                    self._pos += len(src)
                else:
                    break
                buf += self._inflate.decompress(src, n - len(buf))
                self._pending = self._inflate.unconsumed_tail
                if self._inflate.eof:  # a gzip member ended: another may follow
                    rest = self._inflate.unused_data + bytes(self._view[self._pos :])
                    self._view, self._pos, self._pending = memoryview(rest), 0, b""
                    if not rest.startswith(GZIP_MAGIC):
                        break
                    self._inflate = zlib.decompressobj(wbits=31)
        except zlib.error as exc:
            raise InputError(
                f"corrupt gzip in {self._what}: {exc} (not a readable NIfTI)"
            ) from None
        return buf

    def skip(self, n: int) -> int:
        """Discard ``n`` bytes; how many there were."""
        done = 0
        while done < n:
            got = len(self.read(min(n - done, 1 << 20)))
            if not got:
                break
            done += got
        return done


def inflate(data: bytes | memoryview, what: str) -> bytes:
    """The whole uncompressed content of a file's bytes, gzipped or not (unbounded).

    Raises:
        InputError: If the bytes are empty, or a gzip stream is corrupt or ends early.
    """
    if not len(data):
        raise InputError(f"{what} is empty")
    if bytes(data[:2]) != GZIP_MAGIC:
        return bytes(data)
    stream = _Stream(data, what)
    parts = []
    while part := stream.read(1 << 26):
        parts.append(bytes(part))
    if not stream.complete:
        raise InputError(
            f"corrupt gzip in {what}: compressed data ends before its end-of-stream marker"
        )
    return b"".join(parts)


def _header(stream: _Stream, what: str) -> tuple[Any, int]:
    """The checked NIfTI-1/2 header at the start of ``stream``, and its size (348 or 540)."""
    head = bytes(stream.read(348))
    if len(head) < 348:
        raise InputError(f"{what} is not a readable NIfTI: {len(head)} bytes, less than a header")
    sizes = {int.from_bytes(head[:4], order) for order in ("little", "big")}
    size = next((s for s in _KINDS if s in sizes), None)
    if size is None:
        raise InputError(f"{what} is not a NIfTI-1 or NIfTI-2 image (sizeof_hdr is neither)")
    if size > 348:
        head += bytes(stream.read(size - 348))
        if len(head) < size:
            raise InputError(f"{what} is not a readable NIfTI: truncated NIfTI-2 header")
    klass, _image, magic = _KINDS[size]
    try:
        hdr = klass(binaryblock=head, check=True)
    except Exception as exc:  # nibabel's checks raise several types on hostile headers
        raise InputError(f"{what} has an invalid NIfTI header: {exc}") from None
    if bytes(hdr["magic"]).rstrip(b"\0") != magic:
        raise InputError(
            f"{what}: NIfTI magic {bytes(hdr['magic'])!r} is not a single-file image ({magic!r})"
        )
    return hdr, size


@dataclass
class _Layout:
    """What a checked header says about the voxels: type, shape, offset, grid and scaling."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int
    affine: np.ndarray
    zooms: tuple[float, ...]
    scaling: tuple[float, float] | None  # (slope, inter) when the voxels are scaled


def _layout(hdr: Any, what: str) -> _Layout:
    """The voxel layout a header announces, refused unless scalar, 3D/4D, finite and placeable."""
    try:
        dtype = hdr.get_data_dtype()
        shape = tuple(int(d) for d in hdr.get_data_shape())
        offset = int(hdr.get_data_offset())
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
        zooms = tuple(float(z) for z in hdr.get_zooms()[:3])
        slope, inter = hdr.get_slope_inter()
    except Exception as exc:
        raise InputError(f"{what} has an invalid NIfTI header: {exc}") from None
    if dtype.fields is not None or dtype.kind not in "iuf" or dtype.itemsize > 8:
        code = int(hdr["datatype"])
        raise InputError(
            f"{what}: NIfTI datatype {code} ({dtype}) is not a scalar integer or float type"
        )
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or any(d < 1 for d in shape):
        raise InputError(f"{what}: NIfTI dims {list(shape)} are not a 3D or 4D volume")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{what}: the header's affine is singular or not finite")
    scaled = slope is not None and (slope != 1.0 or (inter or 0.0) != 0.0)
    if scaled and not (math.isfinite(slope) and math.isfinite(inter or 0.0)):
        raise InputError(f"{what}: scl_slope/scl_inter are not finite")
    scaling = (float(slope), float(inter or 0.0)) if scaled else None
    return _Layout(dtype, shape, offset, affine, zooms, scaling)


def _check_limits(
    layout: _Layout, size: int, what: str, limits: ServerLimits, voxels_left: int
) -> None:
    """Refuse a layout beyond the server's limits, before any voxel is read."""
    shape, voxels = layout.shape, math.prod(layout.shape)
    if voxels > voxels_left:
        raise InputError(
            f"{what}: header announces {format_shape(shape)} = {voxels} voxels; the case may "
            f"hold {voxels_left} more (max_case_voxels={limits.max_case_voxels})"
        )
    if max(shape[:3]) > limits.max_edge:
        raise InputError(
            f"{what}: header announces {format_shape(shape)}; each edge must be at most "
            f"max_edge={limits.max_edge} voxels"
        )
    if layout.offset > size + 4 + limits.max_request_bytes:
        raise InputError(f"{what}: vox_offset {layout.offset} is outside the file's header area")


def decode(
    data: bytes | memoryview,
    what: str,
    dtype: type | None = np.float32,
    *,
    limits: ServerLimits | None = None,
    voxels_left: int | None = None,
    budget: list[int] | None = None,
) -> Volume:
    """Decode NIfTI-1/2 bytes, gzipped or not, reading every voxel (truncation shows here).

    Args:
        data: The file's bytes.
        what: Names the file in error messages (``input 'nifti' file 2``).
        dtype: Cast the voxels to this type; ``None`` keeps the stored type (float64 if scaled).
        limits: Read within these limits (the server's bounded mode); ``None`` reads any size.
        voxels_left: Voxels the case may still hold (default ``limits.max_case_voxels``).
        budget: ``[bytes]`` that decompression may still produce, shared by a request's files
            (default ``limits.max_decoded_bytes``).

    Raises:
        InputError: If the bytes are not a readable single-file NIfTI with a scalar datatype and
            a 3D/4D grid, are shorter than their header says, or (bounded) break a limit.
    """
    if limits is None:  # a trusted file: inflate it whole, so a truncated gzip shows as such
        stream = _Stream(inflate(data, what), what)
    else:
        if not len(data):
            raise InputError(f"{what} is empty")
        stream = _Stream(data, what, [limits.max_decoded_bytes] if budget is None else budget)
    hdr, size = _header(stream, what)
    layout = _layout(hdr, what)
    if limits is not None:
        left = limits.max_case_voxels if voxels_left is None else voxels_left
        _check_limits(layout, size, what, limits, left)
    if layout.offset < size + 4:
        raise InputError(f"{what}: vox_offset {layout.offset} is outside the file's header area")
    if stream.skip(layout.offset - size) < layout.offset - size:
        raise InputError(f"{what} is not a readable NIfTI: it ends inside its extensions")
    return Volume(_voxels(stream, layout, what, dtype), layout.affine, layout.zooms)


def _voxels(stream: _Stream, layout: _Layout, what: str, dtype: type | None) -> np.ndarray:
    """The voxels the layout announces, read from ``stream``, scaled and cast as nibabel does."""
    voxels, stored = math.prod(layout.shape), layout.dtype
    nbytes = voxels * stored.itemsize
    raw = stream.read(nbytes)
    if len(raw) < nbytes:
        raise InputError(
            f"{what} is not a readable NIfTI: truncated, {len(raw)} of the {nbytes} voxel bytes "
            f"that its header ({format_shape(layout.shape)} {stored}) announces"
        )
    arr = np.frombuffer(raw, dtype=stored, count=voxels).reshape(layout.shape, order="F")
    if layout.scaling is None:
        return arr.astype(stored.newbyteorder("=") if dtype is None else dtype)
    # as nibabel's ArrayProxy scales: in float64, then cast
    slope, inter = layout.scaling
    wide = np.multiply(arr, np.float64(slope))
    if inter:
        wide += np.float64(inter)
    return wide if dtype is None else wide.astype(dtype)


def open_image(data: bytes, what: str) -> tuple[bytes, Image]:
    """The uncompressed bytes of a NIfTI-1/2 file, gzipped or not, and its nibabel image.

    Args:
        data: The file's bytes.
        what: Names the file in error messages.

    Raises:
        InputError: If the bytes are empty, not gzip when they claim to be, or not NIfTI.
    """
    raw = inflate(data, what)
    _hdr, size = _header(_Stream(raw, what), what)
    try:
        return raw, _KINDS[size][1].from_bytes(raw)
    except Exception:
        raise InputError(f"{what} is not a readable NIfTI-1/2 file") from None


def read_voxels(img: Image, what: str, dtype: type | None = np.float32) -> np.ndarray:
    """Every voxel of an opened image (a truncated file fails here), cast to ``dtype`` if given.

    Raises:
        MedsegError: If the voxel data cannot be read.
    """
    try:
        return np.asarray(img.dataobj) if dtype is None else np.asarray(img.dataobj, dtype)
    except Exception as exc:
        raise MedsegError(f"{what}: voxel data unreadable ({exc})") from None


def encode_label_map(label: np.ndarray, affine: np.ndarray) -> bytes:
    """A label map as gzipped NIfTI-1 bytes (uint8; fast compression: label maps are sparse)."""
    img = nib.Nifti1Image(np.asarray(label, dtype=np.uint8), np.asarray(affine, np.float64))
    img.header.set_data_dtype(np.uint8)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)
