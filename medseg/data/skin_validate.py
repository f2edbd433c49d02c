"""Validate and de-identify one dermoscopy image on its way into a dataset version.

An image is accepted when its layout gave it a class and a lesion, its file decodes as a JPEG or
PNG within the server's limits (:func:`medseg.io.images.decode_image`: what the served model
could not take is not stored either), it is at least :data:`MIN_EDGE` pixels on each side and
it is not blank (one colour). It is stored de-identified: the decoded pixels, upright, written
again as a PNG with no metadata (:func:`medseg.io.images.encode_png`), so EXIF (camera,
dates, GPS, free text), XMP, ICC profiles, JPEG comments and PNG text chunks do not enter the
store, and the stored pixels are exactly those that were checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medseg.core.errors import InputError
from medseg.core.settings import ServerLimits
from medseg.core.storage import sha256_file, write_local
from medseg.data.manifest import CaseEntry, FileEntry, QuarantinedCase
from medseg.data.skin_layouts import RawImage
from medseg.io.images import decode_image, encode_png

__all__ = ["MIN_EDGE", "CheckedImage", "check_image"]

#: The smallest width or height of an image worth a diagnosis.
MIN_EDGE = 32
#: The role of an image's one file in the manifest.
ROLE = "image"


@dataclass
class CheckedImage:
    """An image's manifest entry (split unset) and staged file, or its quarantine."""

    case_id: str
    entry: CaseEntry | None = None
    quarantine: QuarantinedCase | None = None
    staged: dict[str, Path] = field(default_factory=dict)


def _quarantine(raw: RawImage, file: str | None, reason: str) -> CheckedImage:
    return CheckedImage(
        raw.image_id, quarantine=QuarantinedCase(case_id=raw.image_id, file=file, reason=reason)
    )


def check_image(raw: RawImage, staging: str) -> CheckedImage:
    """Validate one image; its entry and staged PNG, or its quarantine with the reason.

    Args:
        raw: The image as its layout lists it.
        staging: Local folder for the de-identified file.
    """
    if raw.problem is not None:
        return _quarantine(raw, *raw.problem)
    if raw.path is None or raw.label is None:  # a layout sets a problem for these
        return _quarantine(raw, None, f"{raw.image_id} has no file or no class")
    name = raw.path.name
    try:
        data = raw.path.read_bytes()
        pixels = decode_image(data, name, ServerLimits())
    except InputError as exc:
        return _quarantine(raw, name, str(exc))
    except OSError as exc:
        return _quarantine(raw, name, f"{name} is unreadable: {exc.strerror or exc}")
    _, height, width = pixels.shape
    if min(height, width) < MIN_EDGE:
        return _quarantine(
            raw, name, f"{name} is {width}×{height} pixels, less than {MIN_EDGE} on a side"
        )
    flat = pixels.reshape(3, -1)
    if (flat == flat[:, :1]).all():
        colour = tuple(int(v) for v in flat[:, 0])
        return _quarantine(raw, name, f"blank image: every pixel of {name} is RGB {colour}")
    dest = Path(staging) / raw.image_id / f"{raw.image_id}.png"
    write_local(dest, encode_png(pixels))
    entry = CaseEntry(
        case_id=raw.image_id,
        split="train",
        files=[
            FileEntry(
                role=ROLE,
                key=f"raw/{raw.image_id}/{dest.name}",
                sha256=sha256_file(dest),
                size=dest.stat().st_size,
            )
        ],
        shape=(int(height), int(width)),
        label=raw.label,
        group=raw.group,
    )
    return CheckedImage(raw.image_id, entry=entry, staged={ROLE: dest})
