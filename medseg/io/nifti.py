"""The NIfTI codec of the library: bytes to voxels with their grid, and label maps to bytes.

Batch prediction and evaluation read every raw volume and label map through :func:`decode`, and
every label map they write goes through :func:`encode_label_map`; a failure names the file and
the reason (:class:`~medseg.core.errors.MedsegError`), never a traceback.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from medseg.core.errors import MedsegError

__all__ = ["GZIP_MAGIC", "Volume", "decode", "encode_label_map", "open_image", "read_voxels"]

#: The first two bytes of a gzip stream.
GZIP_MAGIC = b"\x1f\x8b"
#: What :func:`open_image` returns.
Image = nib.Nifti1Image | nib.Nifti2Image


@dataclass
class Volume:
    """Decoded voxels and the grid they lie on.

    Attributes:
        data: The voxels (float32 for images, as stored for :func:`decode` with ``raw``).
        affine: ``4×4`` voxel-to-world affine in mm.
        zooms: Voxel size along each array axis, in mm.
    """

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, ...]


def decode(data: bytes, what: str, dtype: type | None = np.float32) -> Volume:
    """Decode NIfTI-1/2 bytes, gzipped or not, reading every voxel (truncation shows here).

    Args:
        data: The file's bytes.
        what: Names the file in error messages.
        dtype: Cast the voxels to this type; ``None`` keeps the stored type.

    Raises:
        MedsegError: If the bytes are empty, not gzip when they claim to be, or not NIfTI.
    """
    _raw, img = open_image(data, what)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Volume(read_voxels(img, what, dtype), np.asarray(img.affine, dtype=np.float64), zooms)


def open_image(data: bytes, what: str) -> tuple[bytes, Image]:
    """The uncompressed bytes of a NIfTI-1/2 file, gzipped or not, and its nibabel image.

    Args:
        data: The file's bytes.
        what: Names the file in error messages.

    Raises:
        MedsegError: If the bytes are empty, not gzip when they claim to be, or not NIfTI.
    """
    if not data:
        raise MedsegError(f"{what} is empty")
    try:
        raw = gzip.decompress(data) if data[:2] == GZIP_MAGIC else data
    except (OSError, EOFError, zlib.error) as exc:
        raise MedsegError(f"corrupt gzip in {what}: {exc}") from None
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return raw, cls.from_bytes(raw)
        except Exception:
            continue
    raise MedsegError(f"{what} is not a readable NIfTI-1/2 file")


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
