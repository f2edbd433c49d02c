"""2D images (JPEG, PNG): bounded decoding to ``[3, H, W]``, and de-identified re-encoding.

One reader for the server and for ingest, which treats its input as hostile the way
:func:`medseg.serving.codec.decode_nifti` does: a header may claim 60000×60000 pixels, and a PNG of
a few kilobytes may inflate to gigabytes. :func:`decode_image` therefore

1. checks the magic bytes (JPEG or PNG, nothing else reaches a Pillow decoder);
2. opens the image lazily, which parses the header only (Pillow reads the JPEG SOF marker and
   the PNG IHDR chunk; its text chunks are bounded by ``PngImagePlugin.MAX_TEXT_CHUNK``);
3. checks the announced width, height and pixel count against
   :class:`~medseg.core.settings.ServerLimits` (``max_image_edge``, ``max_image_pixels``) and the
   request's remaining pixel budget, and the pixel mode;
4. only then decodes the pixels: Pillow allocates width × height × bands once, and its
   decoders stop at that many pixels however long the compressed stream is.

Pillow refuses on its own, while opening, an image of more than twice
``Image.MAX_IMAGE_PIXELS`` (about 179 MP); that refusal becomes the same :class:`InputError`.
Every refusal names the input, the problem and the limit, and is an
:class:`~medseg.core.errors.InputError` (the server answers it with a 400).

:func:`encode_png` is the de-identification of ingest: only the pixels are written again
(after the EXIF orientation is applied to them), so EXIF, XMP, ICC profiles, JPEG comments and
PNG text chunks are all gone, and the same pixels always give the same bytes.
"""

from __future__ import annotations

import io

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps

from medseg.core.errors import InputError
from medseg.core.settings import ServerLimits

__all__ = ["FORMATS", "decode_image", "encode_png", "image_size"]

#: Magic bytes of the accepted formats, and Pillow's name of each.
FORMATS: dict[bytes, str] = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
#: Pixel modes that convert to RGB without loss of meaning (no 16-bit or float images).
_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})


def _format(data: bytes | memoryview, what: str) -> str:
    head = bytes(data[:8])
    for magic, name in FORMATS.items():
        if head.startswith(magic):
            return name
    raise InputError(f"{what} is not a JPEG or PNG image (magic bytes {head[:4]!r})")


def _open(
    data: bytes | memoryview, what: str, limits: ServerLimits, pixels_left: int
) -> Image.Image:
    """The image, opened lazily (header only), its size checked against the limits."""
    if not len(data):
        raise InputError(f"{what} is empty")
    fmt = _format(data, what)
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise InputError(
            f"{what}: its {fmt} header announces more pixels than may be decoded ({exc}; "
            f"max_image_pixels={limits.max_image_pixels})"
        ) from None
    except Exception as exc:  # Pillow raises several types on hostile headers
        raise InputError(f"{what} is not a readable {fmt} image: {exc}") from None
    width, height = img.size
    pixels = width * height
    if max(width, height) > limits.max_image_edge:
        raise InputError(
            f"{what}: header announces {width}×{height} pixels; width and height must be at most "
            f"max_image_edge={limits.max_image_edge}"
        )
    if pixels > pixels_left:
        raise InputError(
            f"{what}: header announces {width}×{height} = {pixels} pixels; the request may hold "
            f"{pixels_left} more (max_image_pixels={limits.max_image_pixels})"
        )
    if img.mode not in _MODES:
        raise InputError(f"{what}: pixel mode {img.mode} is not 8-bit grey, palette or colour")
    return img


def image_size(
    data: bytes | memoryview, what: str, limits: ServerLimits, pixels_left: int | None = None
) -> tuple[int, int]:
    """``(width, height)`` from the header alone, within the limits (see :func:`decode_image`).

    Raises:
        InputError: As :func:`decode_image`, for what the header shows.
    """
    left = limits.max_image_pixels if pixels_left is None else pixels_left
    with _open(data, what, limits, left) as img:
        return (int(img.size[0]), int(img.size[1]))


def decode_image(
    data: bytes | memoryview,
    what: str,
    limits: ServerLimits,
    pixels_left: int | None = None,
) -> NDArray[np.uint8]:
    """RGB pixels ``[3, H, W]`` (uint8) of JPEG or PNG bytes, decoded within limits.

    The EXIF orientation, when there is one, is applied, so the array is upright as a viewer
    shows it. Grey, palette and CMYK images become RGB; an alpha channel is dropped.

    Args:
        data: The file's bytes.
        what: How messages name this image (``input 'image' element 2``).
        limits: The server's limits.
        pixels_left: Pixels the request may still decode (default ``limits.max_image_pixels``).

    Returns:
        The pixels, channels first.

    Raises:
        InputError: If the bytes are not a JPEG or PNG, announce too many pixels or too long an
            edge, have a mode that is not 8-bit, or are corrupt or truncated.
    """
    left = limits.max_image_pixels if pixels_left is None else pixels_left
    with _open(data, what, limits, left) as img:
        try:
            img.load()
            upright = ImageOps.exif_transpose(img)
            rgb = upright.convert("RGB")
        except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, …
            raise InputError(f"{what} is not a readable {img.format} image: {exc}") from None
    hwc = np.asarray(rgb, dtype=np.uint8)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def encode_png(pixels: NDArray[np.uint8]) -> bytes:
    """PNG bytes of ``[3, H, W]`` RGB pixels and nothing else (no metadata chunk).

    The bytes depend only on the pixels (zlib level 6, no timestamps), so re-encoding the same
    image gives the same content hash.
    """
    if pixels.ndim != 3 or pixels.shape[0] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels [3, H, W], got {pixels.dtype} {pixels.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB").save(
        buf, "PNG", compress_level=6
    )
    return buf.getvalue()
