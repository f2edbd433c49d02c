"""Bounded JPEG/PNG decoding: good images, hostile headers and bombs refused at bounded memory."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.core.errors import InputError
from medseg.core.settings import ServerLimits
from medseg.io.images import decode_image, encode_png, image_size

LIMITS = ServerLimits()
ROOT = Path(__file__).resolve().parents[3]


def _pixels(h: int = 45, w: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)


def _save(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of ``width``×``height`` zeros: kilobytes that inflate to w×h bytes.

    The rows are compressed one at a time, so building it holds one row, never the image.
    """
    comp = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the row's pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 16×16 JPEG whose SOF0 header is rewritten to announce ``width``×``height``."""
    data = bytearray(_save(Image.new("RGB", (16, 16), (200, 120, 90)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    # SOF0: marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_jpeg_decodes_to_channels_first_rgb() -> None:
    rows, cols = np.mgrid[0:45, 0:60]
    smooth = np.stack([rows * 4, cols * 3, rows + cols + 60]).astype(np.uint8)
    data = _save(Image.fromarray(smooth.transpose(1, 2, 0)), "JPEG", quality=95)
    out = decode_image(data, "x", LIMITS)
    assert out.shape == (3, 45, 60) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert np.array_equal(out, np.asarray(Image.open(io.BytesIO(data))).transpose(2, 0, 1))
    assert np.abs(out.astype(int) - smooth).mean() < 2  # lossy, but the same image


def test_png_round_trip_is_exact_and_deterministic() -> None:
    px = _pixels()
    data = encode_png(px)
    assert np.array_equal(decode_image(data, "x", LIMITS), px)
    assert encode_png(px) == data
    assert image_size(data, "x", LIMITS) == (60, 45)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1"])
def test_other_8bit_modes_become_rgb(mode: str) -> None:
    rgb = Image.fromarray(_pixels().transpose(1, 2, 0))
    img = rgb.convert(mode)
    out = decode_image(_save(img, "PNG"), "x", LIMITS)
    assert out.shape == (3, 45, 60)
    assert np.array_equal(out, np.asarray(img.convert("RGB")).transpose(2, 0, 1))


def test_exif_orientation_is_applied() -> None:
    px = _pixels()
    img = Image.fromarray(px.transpose(1, 2, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer rotates the stored pixels 90° clockwise
    out = decode_image(_save(img, "PNG", exif=exif.tobytes()), "x", LIMITS)
    upright = np.asarray(img.transpose(Image.Transpose.ROTATE_270)).transpose(2, 0, 1)
    assert out.shape == (3, 60, 45) and np.array_equal(out, upright)


def test_bad_bytes_are_refused_with_their_reason() -> None:
    good = _save(Image.fromarray(_pixels().transpose(1, 2, 0)), "JPEG")
    cases = {
        b"": "input 'image' is empty",
        b"GIF89a" + bytes(40): "input 'image' is not a JPEG or PNG image (magic bytes b'GIF8')",
        good[
            : len(good) // 2
        ]: "input 'image' is not a readable JPEG image: image file is truncated",
        b"\x89PNG\r\n\x1a\n" + bytes(30): "input 'image' is not a readable PNG image",
    }
    for data, message in cases.items():
        with pytest.raises(InputError) as err:
            decode_image(data, "input 'image'", LIMITS)
        assert str(err.value).startswith(message), str(err.value)
    sixteen = _save(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)), "PNG")
    with pytest.raises(InputError, match=r"pixel mode I;16 is not 8-bit"):
        decode_image(sixteen, "x", LIMITS)


def test_header_sizes_are_checked_before_decoding() -> None:
    small = ServerLimits(max_image_pixels=1_000_000, max_image_edge=2000)
    with pytest.raises(InputError) as err:
        image_size(jpeg_claiming(1500, 1000), "input 'image' element 1", small)
    assert str(err.value) == (
        "input 'image' element 1: header announces 1500×1000 = 1500000 pixels; the request may "
        "hold 1000000 more (max_image_pixels=1000000)"
    )
    with pytest.raises(InputError, match=r"20000×10 pixels; .* max_image_edge=2000"):
        decode_image(jpeg_claiming(20000, 10), "x", small)
    # A request's budget is shared by its images: the second of two may get less.
    with pytest.raises(InputError, match="may hold 100 more"):
        decode_image(encode_png(_pixels()), "x", small, pixels_left=100)


def test_sixty_thousand_square_jpeg_is_refused() -> None:
    # 3.6e9 pixels: beyond Pillow's own bound, which refuses it while reading the header.
    with pytest.raises(InputError, match=r"JPEG header announces more pixels than may be decoded"):
        decode_image(jpeg_claiming(60000, 60000), "x", LIMITS)
    # 40000×1000 is within Pillow's bound: ours refuses it.
    with pytest.raises(InputError, match=r"40000×1000 pixels; .* max_image_edge=16384"):
        decode_image(jpeg_claiming(40000, 1000), "x", LIMITS)


_PEAK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from medseg.core.settings import ServerLimits
    from medseg.io.images import decode_image
    from tests.unit.io.test_skin_images import jpeg_claiming, png_bomb
    from medseg.core.errors import InputError
    from medseg.core.settings import ServerLimits
    from medseg.io.images import decode_image
    from tests.unit.io.test_skin_images import jpeg_claiming, png_bomb

    kind, width, height = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    data = png_bomb(width, height) if kind == "png" else jpeg_claiming(width, height)
    limits = ServerLimits(max_image_pixels=10_000_000)

    def status(key):
        lines = Path("/proc/self/status").read_text().splitlines()
        line = next(x for x in lines if x.startswith(key))
        return int(line.split()[1]) // 1024

    decode_image(png_bomb(64, 64), "warm-up", limits)  # import Pillow's plugins first
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    before = status("VmRSS:")
    try:
        decode_image(data, "x", limits)
        outcome = "decoded"
    except InputError:
        outcome = "refused"
    print(outcome, len(data), status("VmHWM:") - before)
    """
)


def _peak(kind: str, width: int, height: int) -> tuple[str, int, int]:
    """Decode in a fresh process; its outcome, the file's size and the peak RSS growth (MiB)."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, kind, str(width), str(height)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    outcome, size, growth = done.stdout.split()
    return outcome, int(size), int(growth)


def test_refusals_happen_at_bounded_memory() -> None:
    # The meter sees Pillow's buffers: an accepted 3000×3000 grey PNG (9 MB of pixels, a
    # 36 MB RGBX image in Pillow and 27 MB arrays after it) grows the peak by tens of MiB.
    outcome, _, growth = _peak("png", 3000, 3000)
    assert outcome == "decoded" and growth >= 30, growth
    # A 12000×12000 PNG bomb: 144 MB of pixels (432 MB as RGB) from a file of about 140 kB,
    # within Pillow's own bound, refused by ours.
    outcome, size, growth = _peak("png", 12000, 12000)
    assert outcome == "refused" and size < 300_000
    assert growth < 8, f"peak RSS grew {growth} MiB while refusing the bomb"
    outcome, size, growth = _peak("jpeg", 60000, 60000)
    assert outcome == "refused" and size < 1000
    assert growth < 8, f"peak RSS grew {growth} MiB while refusing the 60000×60000 JPEG"
