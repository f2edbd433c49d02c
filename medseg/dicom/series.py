"""DICOM MR studies in and out: a study of four MR series ⇄ the canonical 4-channel case.

Reading (:func:`read_study`) turns a study (a folder, a zip, or an ``s3://`` prefix or zip)
into what the NIfTI path produces: ``image`` ``[4, X, Y, Z]`` float32 in
:data:`medseg.config.CHANNELS` order and a 4×4 voxel-to-world affine in the NIfTI (RAS, mm)
convention. Series become channels by :class:`SeriesRules` on SeriesDescription and
ProtocolName. Geometry comes from ImagePositionPatient, ImageOrientationPatient and
PixelSpacing: slices are ordered by their position along the slice normal (never by file name
or InstanceNumber); pydicom decodes the pixels and applies the modality LUT (rescale slope and
intercept). Series on another grid than the reference series are resampled onto its grid
(linear). highdicom's ``get_volume_from_series`` does the same but costs ~20 ms per slice in
per-frame IOD look-ups (measured with highdicom 0.28.2), too slow for the ≤ 2× NIfTI target.

Voxel axes: ``X`` runs along the columns of a slice (ImageOrientationPatient's row cosines),
``Y`` along its rows, ``Z`` from slice to slice in the order of position along the normal.
DICOM's patient space is LPS; the affine returned is RAS (``diag(-1, -1, 1)`` times LPS).

Writing (:func:`write_series`, :func:`write_study`) is the inverse, used by ``medseg synth
--format dicom`` and the tests: one classic MR Image Storage object per slice.
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.pixels.utils import pixel_dtype
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

from medseg.core.errors import MedsegError
from medseg.core.settings import ServerLimits
from medseg.core.storage import Storage, is_s3
from medseg.tasks.brats import CHANNELS

__all__ = [
    "LPS_TO_RAS",
    "ChannelRule",
    "DicomStudy",
    "DicomStudyError",
    "Series",
    "SeriesRules",
    "StudyInfo",
    "find_studies",
    "load_series",
    "read_study",
    "resample",
    "write_series",
    "write_study",
]

#: DICOM patient space (LPS) to NIfTI world (RAS): flip the first two axes. Its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Geometry tolerance (mm, or cosine) when grids are compared or slices stacked.
_GEOMETRY_TOL = 1e-3


class DicomStudyError(MedsegError):
    """A DICOM study cannot become a case; the message names the study, the file and why."""


class ChannelRule(BaseModel):
    """Which series a channel is: regular expressions on SeriesDescription and ProtocolName.

    A series matches when one ``include`` pattern and no ``exclude`` pattern is found
    (``re.search``, case-insensitive) in its SeriesDescription or its ProtocolName.

    Attributes:
        include: Patterns of which one must match.
        exclude: Patterns of which none may match.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()

    @field_validator("include", "exclude")
    @classmethod
    def _compiles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"pattern {pattern!r} is not a regular expression: {exc}"
                ) from None
        return value

    def matches(self, text: str) -> bool:
        """Whether ``text`` (a description or protocol name) names this channel."""
        hit = any(re.search(p, text, re.IGNORECASE) for p in self.include)
        return hit and not any(re.search(p, text, re.IGNORECASE) for p in self.exclude)


# "t1" not followed by a digit, and not inside a longer token such as "dt1" ("_" and "-" separate).
_T1 = r"(?<![a-z0-9])t1(?![0-9])"
_T2 = r"(?<![a-z0-9])t2(?![0-9])"
_CONTRAST = (r"gd", r"gad", r"contrast", r"post", r"(?<![a-z])ce(?![a-z])", r"\+ ?c\b", r"t1c")


class SeriesRules(BaseModel):
    """How the series of a study become the four channels, and which grid they share.

    Attributes:
        channels: One rule per canonical channel.
        reference: The channel whose grid the case takes (the others are resampled onto it).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    channels: dict[str, ChannelRule] = {
        "t1": ChannelRule(
            include=(_T1, r"t1w", r"t1n", r"mprage", r"spgr"),
            exclude=(*_CONTRAST, r"flair"),
        ),
        "t1gd": ChannelRule(
            include=(
                rf"{_T1}.*({'|'.join(_CONTRAST)})",
                rf"({'|'.join(_CONTRAST[:4])}).*{_T1}",
                r"t1c(?![a-z])",
                r"t1ce",
            )
        ),
        "t2": ChannelRule(include=(_T2, r"t2w"), exclude=(r"flair", r"t2f", r"dark.?fluid", r"\*")),
        "flair": ChannelRule(include=(r"flair", r"t2f", r"dark.?fluid")),
    }
    reference: str = "t1gd"

    @model_validator(mode="after")
    def _complete(self) -> SeriesRules:
        if sorted(self.channels) != sorted(CHANNELS):
            raise ValueError(
                f"rules must name each channel of {CHANNELS}, got {sorted(self.channels)}"
            )
        if self.reference not in CHANNELS:
            raise ValueError(f"reference {self.reference!r} is not one of {CHANNELS}")
        return self


@dataclass
class Series:
    """The images of one series as read, before geometry.

    Attributes:
        uid: SeriesInstanceUID.
        datasets: Its images, in the order read.
        files: The file (or object, or zip member) each image came from.
    """

    uid: str
    datasets: list[Dataset]
    files: list[str]

    @property
    def description(self) -> str:
        return str(self.datasets[0].get("SeriesDescription", ""))

    @property
    def protocol(self) -> str:
        return str(self.datasets[0].get("ProtocolName", ""))

    def summary(self) -> str:
        first = self.datasets[0]
        return (
            f"series {first.get('SeriesNumber', '?')} "
            f"(SeriesDescription {self.description!r}, ProtocolName {self.protocol!r}, "
            f"{first.get('Modality', '?')}, {len(self.datasets)} images)"
        )


@dataclass
class DicomStudy:
    """A study read into the canonical case.

    Attributes:
        image: ``[4, X, Y, Z]`` float32 in :data:`medseg.config.CHANNELS` order, on the
            reference series' grid, rescale slope and intercept applied; each channel is
            Fortran-ordered, as NIfTI stores voxels (a view, not a copy, of the decoded slices).
        affine: Voxel-to-world affine (RAS, mm) of ``image``.
        reference: The reference series' images (headers and pixels) in ``Z`` order: what a
            segmentation of ``image`` refers to.
        series_uids: SeriesInstanceUID of each channel.
        resampled: Channels that were resampled onto the reference grid.
    """

    image: NDArray[np.float32]
    affine: NDArray[np.float64]
    reference: list[Dataset]
    series_uids: dict[str, str]
    resampled: list[str] = field(default_factory=list)

    @property
    def study_uid(self) -> str:
        """StudyInstanceUID of the study."""
        return str(self.reference[0].StudyInstanceUID)


# -- reading ----------------------------------------------------------------------------------


def _parse(data: bytes | str, name: str, where: str) -> Dataset | None:
    """One DICOM file; ``None`` for a file that is not DICOM at all (no preamble, no meta)."""
    try:
        src = io.BytesIO(data) if isinstance(data, bytes) else data
        return pydicom.dcmread(src)
    except InvalidDicomError:
        return None
    except Exception as exc:  # a truncated or corrupt file: name it, never a traceback
        raise DicomStudyError(f"{where}: {name} is not a readable DICOM file ({exc})") from None


def _zip_directory(raw: bytes, where: str, limits: ServerLimits) -> None:
    """Refuse, before :mod:`zipfile` parses it, a central directory too large for a study.

    :mod:`zipfile` reads every central directory entry into an object of a few hundred bytes;
    the end-of-central-directory record (PKWARE APPNOTE 4.3.16) states the directory's size,
    so a body of millions of tiny entries is refused before any is parsed.
    """
    end = raw.rfind(b"PK\x05\x06", max(0, len(raw) - (1 << 16) - 22))
    if end < 0 or end + 22 > len(raw):
        raise DicomStudyError(f"{where}: not a zip archive (no end of central directory)")
    entries = int.from_bytes(raw[end + 10 : end + 12], "little")
    size = int.from_bytes(raw[end + 12 : end + 16], "little")
    if entries == 0xFFFF or size == 0xFFFFFFFF:
        raise DicomStudyError(f"{where}: a zip64 archive; a study fits a plain zip")
    most = max_study_files(limits)
    if entries > most or size > most * _MAX_ZIP_ENTRY:
        raise DicomStudyError(
            f"{where}: the zip holds {entries} entries in a {size}-byte directory; a study may "
            f"hold {most} files (2 × 4 series × max_edge={limits.max_edge})"
        )


#: Largest central directory entry counted per file (46 bytes and a name of a few hundred).
_MAX_ZIP_ENTRY = 512


def max_study_files(limits: ServerLimits) -> int:
    """Files a study sent to the server may hold: four series of ``max_edge`` slices, twice."""
    return 2 * len(CHANNELS) * limits.max_edge


def _zip_members(
    raw: bytes, where: str, limits: ServerLimits | None
) -> Iterator[tuple[str, Dataset | None]]:
    """Every member of a zip held in memory, within ``limits`` when given.

    Members are inflated by :func:`_inflate`, in bounded steps and never past the size their
    directory entry declares, so the declared sizes, summed before anything is inflated, bound
    the bytes a zip bomb can make.
    """
    if limits is not None:
        _zip_directory(raw, where, limits)
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise DicomStudyError(f"{where}: not a zip archive ({exc})") from None
    with archive:
        members = [i for i in archive.infolist() if not i.is_dir()]
        if limits is not None:
            declared = sum(i.file_size for i in members)
            if len(members) > max_study_files(limits) or declared > limits.max_decoded_bytes:
                raise DicomStudyError(
                    f"{where}: the zip's {len(members)} files inflate to {declared} bytes, "
                    f"above the {limits.max_decoded_bytes} bytes a request may decode "
                    "(max_decoded_bytes, from max_case_voxels and max_request_mb)"
                )
        for info in members:
            try:
                data = _inflate(archive, info, where)
            except (zipfile.BadZipFile, NotImplementedError, ValueError, EOFError) as exc:
                raise DicomStudyError(
                    f"{where}: {info.filename} cannot be unzipped ({exc})"
                ) from None
            except zlib.error as exc:
                raise DicomStudyError(f"{where}: {info.filename} is corrupt ({exc})") from None
            yield info.filename, _parse(data, info.filename, where)


#: Bytes a zip member is inflated by at a time (:func:`_inflate`).
_INFLATE_STEP = 1 << 20


def _inflate(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> bytes:
    """A member's bytes, inflated ``_INFLATE_STEP`` at a time and at most to its declared size.

    ``ZipFile.read`` asks zlib for up to 2 GiB in one call and only then cuts the output to the
    declared size, so a member that lies about its size cost its whole inflated size in memory
    before the CRC check refused it (142 MiB traced for a 64 MiB member declaring 1000 bytes).
    Here zipfile's CRC check fires once the declared size is read; a byte past it is an error.

    Raises:
        DicomStudyError: If the member inflates past its declared size.
    """
    out = bytearray()
    with archive.open(info) as member:
        while chunk := member.read(min(_INFLATE_STEP, info.file_size + 1 - len(out))):
            out += chunk
            if len(out) > info.file_size:
                raise DicomStudyError(
                    f"{where}: {info.filename} cannot be unzipped (it inflates past the "
                    f"{info.file_size} bytes its directory entry declares)"
                )
    return bytes(out)


def _load(
    source: str | Path | bytes, storage: Storage | None, limits: ServerLimits | None = None
) -> Iterable[tuple[str, Dataset | None]]:
    """Every file of the study as ``(name, dataset or None)``."""
    if isinstance(source, bytes):
        yield from _zip_members(source, _IN_MEMORY, limits)
        return
    where = str(source)
    if str(source).lower().endswith(".zip"):
        yield from _zip_members((storage or Storage()).get_bytes(str(source)), where, limits)
        return
    if is_s3(where):
        store = storage or Storage()
        for obj in store.list(where):
            yield obj.uri, _parse(store.get_bytes(obj.uri), obj.uri, where)
        return
    root = Path(source)
    if not root.is_dir():
        raise DicomStudyError(f"{where}: no such folder or zip")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        yield str(path), _parse(str(path), path.name, where)


#: How messages name a study sent as zip bytes.
_IN_MEMORY = "the study zip"


def _group(files: Iterable[tuple[str, Dataset | None]], where: str) -> dict[str, Series]:
    """Image series by SeriesInstanceUID (non-image objects and non-DICOM files skipped)."""
    series: dict[str, Series] = {}
    studies: set[str] = set()
    for name, ds in files:
        if ds is None:
            continue
        if "PixelData" not in ds:
            meta = getattr(ds, "file_meta", None)
            sop_class = ds.get("SOPClassUID") or (meta or {}).get("MediaStorageSOPClassUID")
            if "Image Storage" in getattr(sop_class, "name", ""):
                raise DicomStudyError(
                    f"{where}: {name} is an image without pixel data (truncated?)"
                )
            continue  # a report, a presentation state, a DICOMDIR: not a series to read
        if "SeriesInstanceUID" not in ds:
            raise DicomStudyError(f"{where}: {name} has no SeriesInstanceUID")
        if ds.get("Modality") == "MR" and int(ds.get("NumberOfFrames") or 1) > 1:
            raise DicomStudyError(
                f"{where}: {name} is a multi-frame (enhanced) MR image; medseg reads classic "
                "single-frame series (convert it first, e.g. with dcmtk's or dicom3tools' tools)"
            )
        studies.add(str(ds.get("StudyInstanceUID", "")))
        uid = str(ds.SeriesInstanceUID)
        entry = series.setdefault(uid, Series(uid, [], []))
        entry.datasets.append(ds)
        entry.files.append(name)
    if len(studies) > 1:
        raise DicomStudyError(f"{where}: holds {len(studies)} studies; give one study at a time")
    if not series:
        raise DicomStudyError(f"{where}: no DICOM image series found")
    return series


def _number(ds: Dataset) -> int:
    try:
        return int(ds.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        return 0


def _match(series: Mapping[str, Series], rules: SeriesRules, where: str) -> dict[str, Series]:
    """Assign one series to each channel, or explain what was found."""
    hits: dict[str, list[Series]] = {c: [] for c in CHANNELS}
    in_order = sorted(series.values(), key=lambda s: (_number(s.datasets[0]), s.uid))
    for s in in_order:
        if str(s.datasets[0].get("Modality", "MR")) != "MR":
            continue
        for channel in CHANNELS:
            rule = rules.channels[channel]
            if rule.matches(s.description) or rule.matches(s.protocol):
                hits[channel].append(s)
    found = "; ".join(s.summary() for s in in_order)
    problems = []
    for channel in CHANNELS:
        if not hits[channel]:
            problems.append(f"no series for channel {channel!r}")
        elif len(hits[channel]) > 1:
            names = ", ".join(repr(s.description or s.protocol) for s in hits[channel])
            problems.append(f"channel {channel!r} is ambiguous: {names} all match")
    chosen = {c: h[0] for c, h in hits.items() if len(h) == 1}
    by_series: dict[str, list[str]] = {}
    for channel, s in chosen.items():
        by_series.setdefault(s.uid, []).append(channel)
    for uid, channels in by_series.items():
        if len(channels) > 1:
            problems.append(f"{series[uid].summary()} matches several channels {channels}")
    if problems:
        raise DicomStudyError(f"{where}: {'; '.join(problems)}. Found: {found}")
    return chosen


def _same(datasets: Sequence[Dataset], keyword: str) -> bool:
    """Whether every dataset holds the same encoded value (bytes, no conversion) as the first."""
    first = datasets[0].get_item(keyword)
    if first is None:
        return False
    return all(getattr(ds.get_item(keyword), "value", None) == first.value for ds in datasets[1:])


def _plane(s: Series, where: str) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The series' ImageOrientationPatient and PixelSpacing, checked equal on every image."""
    first = s.datasets[0]
    # Comparing the encoded values is cheap; only when they differ are the numbers compared.
    # (First, before any attribute access converts the first dataset's raw values.)
    same = all(
        _same(s.datasets, k) for k in ("ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    )
    try:
        orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
        spacing = np.asarray(first.PixelSpacing, dtype=np.float64)
        shape = (int(first.Rows), int(first.Columns))
        same = same or all(
            np.allclose(ds.ImageOrientationPatient, orientation, atol=_GEOMETRY_TOL)
            and np.allclose(ds.PixelSpacing, spacing, atol=_GEOMETRY_TOL)
            and (int(ds.Rows), int(ds.Columns)) == shape
            for ds in s.datasets
        )
    except (AttributeError, ValueError, TypeError) as exc:
        raise DicomStudyError(f"{where}: {s.summary()} lacks plane geometry ({exc})") from None
    if orientation.shape != (6,) or spacing.shape != (2,):
        raise DicomStudyError(f"{where}: {s.summary()} has malformed plane geometry")
    if not same:
        raise DicomStudyError(
            f"{where}: {s.summary()} mixes orientations, pixel spacings or image sizes"
        )
    return orientation, spacing


@dataclass
class _Grid:
    """A series' voxel grid: its images in ``Z`` order and the RAS affine of ``[X, Y, Z]``."""

    order: list[int]
    affine: NDArray[np.float64]
    shape: tuple[int, int, int]  # (X, Y, Z)

    def same_as(self, other: _Grid) -> bool:
        return self.shape == other.shape and bool(
            np.allclose(self.affine, other.affine, atol=_GEOMETRY_TOL)
        )


def _grid(s: Series, where: str) -> _Grid:
    """The voxel grid of a series, from its plane geometry and image positions.

    Slices are ordered by their position along the normal of ImageOrientationPatient (the
    cross product of its row and column cosines), so ``Z`` runs along that normal whatever the
    file names or InstanceNumbers say; the spacing must be regular (no missing slice).
    """
    orientation, spacing = _plane(s, where)
    try:
        positions = np.asarray([ds.ImagePositionPatient for ds in s.datasets], dtype=np.float64)
    except (AttributeError, ValueError, TypeError) as exc:
        raise DicomStudyError(
            f"{where}: {s.summary()} lacks ImagePositionPatient ({exc})"
        ) from None
    if positions.shape[1:] != (3,):
        raise DicomStudyError(f"{where}: {s.summary()} has a malformed ImagePositionPatient")
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    first = s.datasets[0]
    if len(positions) > 1:
        steps = np.diff(positions, axis=0)
        step = steps.mean(axis=0)
        if float(np.dot(step, normal)) < _GEOMETRY_TOL:
            raise DicomStudyError(f"{where}: {s.summary()} has several images at one position")
        if not np.allclose(steps, step, atol=max(0.01 * float(np.linalg.norm(step)), 1e-3)):
            raise DicomStudyError(
                f"{where}: {s.summary()} is not regularly spaced (a slice missing, or "
                f"slices of several stacks); spacings along the normal "
                f"{sorted(set(np.round(steps @ normal, 3).tolist()))} mm"
            )
    else:
        step = normal * float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)))
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[1]  # along a row: column index, column spacing
    lps[:3, 1] = col_cos * spacing[0]  # down a column: row index, row spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    shape = (int(first.Columns), int(first.Rows), len(order))
    return _Grid([int(i) for i in order], LPS_TO_RAS @ lps, shape)


def _read_pixels(s: Series, grid: _Grid, where: str, out: NDArray[np.float32]) -> None:
    """The series' values (modality LUT applied) into ``out``, ``(Z, Y, X)`` C-ordered.

    ``(Z, Y, X)`` in C order is ``[X, Y, Z]`` in Fortran order, the layout NIfTI stores:
    ``out.transpose(2, 1, 0)`` is the volume without a copy.
    """
    # Settled once per series when every image encodes them alike (the usual case).
    view = _native_dtype(s.datasets)
    rescale = _series_rescale(s.datasets)
    for k, i in enumerate(grid.order):
        try:
            _values(s.datasets[i], out[k], view, rescale)
        except Exception as exc:  # undecodable pixel data: name the file, never a traceback
            raise DicomStudyError(
                f"{where}: {s.files[i]} of {s.summary()} has unreadable pixel data ({exc})"
            ) from None


_PIXEL_MODULE = ("SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation")


def _native_dtype(datasets: Sequence[Dataset]) -> np.dtype | None:
    """The dtype to view every image's pixel data with, or ``None`` to decode each with pydicom.

    Native little-endian pixel data whose stored bits fill its allocated bits, the same in every
    image of the series, is viewed in place with pydicom's dtype for it. Anything else
    (compressed, big endian, packed bits, colour, multi-frame) goes through pydicom's decoders.
    The view avoids ~2 ms per image of decoder set-up, which dominated reading a study
    (measured with pydicom 3.0.2).
    """
    syntaxes = {str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")) for ds in datasets}
    if len(syntaxes) != 1 or not all(_same(datasets, k) for k in _PIXEL_MODULE):
        return None
    syntax = UID(syntaxes.pop())
    first = datasets[0]
    if (
        not syntax.is_transfer_syntax
        or syntax.is_compressed
        or syntax.is_deflated
        or not syntax.is_little_endian
        or first.SamplesPerPixel != 1
        or first.BitsAllocated not in (8, 16, 32)
        or first.BitsStored != first.BitsAllocated
        or "NumberOfFrames" in first
    ):
        return None
    return pixel_dtype(first)


def _series_rescale(datasets: Sequence[Dataset]) -> tuple[float, float] | None:
    """The series' (slope, intercept) when every image has the same ones and no LUT."""
    if any("ModalityLUTSequence" in ds for ds in datasets):
        return None
    if not (_same(datasets, "RescaleSlope") and _same(datasets, "RescaleIntercept")):
        if any(k in ds for ds in datasets for k in ("RescaleSlope", "RescaleIntercept")):
            return None  # per-image rescale: each frame reads its own
        return (1.0, 0.0)
    first = datasets[0]
    return float(first.RescaleSlope), float(first.RescaleIntercept)


def _values(
    ds: Dataset,
    out: NDArray[np.float32],
    view: np.dtype | None,
    rescale: tuple[float, float] | None,
) -> None:
    """A frame's values through the modality LUT (rescale slope and intercept), into ``out``."""
    if view is not None:
        stored = np.frombuffer(ds.PixelData, dtype=view, count=out.size).reshape(out.shape)
    else:
        stored = np.asarray(ds.pixel_array)
    if rescale is None and "ModalityLUTSequence" in ds:
        out[...] = apply_modality_lut(stored, ds)
        return
    if rescale is None:
        rescale = (float(ds.get("RescaleSlope") or 1.0), float(ds.get("RescaleIntercept") or 0.0))
    slope, intercept = rescale
    np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
    if intercept:
        out += np.float32(intercept)


def resample(
    array: NDArray[np.float32],
    affine: NDArray[np.float64],
    shape: tuple[int, ...],
    target: NDArray[np.float64],
    order: int = 1,
) -> NDArray[np.float32]:
    """``array`` on ``affine`` resampled onto the grid ``(shape, target)``, 0 outside.

    Args:
        array: ``[X, Y, Z]`` voxels.
        affine: Voxel-to-world affine of ``array``.
        shape: Shape of the target grid.
        target: Voxel-to-world affine of the target grid (same world convention).
        order: Spline order: 1 linear (images), 0 nearest (label maps).

    Returns:
        Float32 voxels on the target grid.
    """
    voxel_map = np.linalg.inv(affine) @ target  # target voxel -> source voxel
    out = ndimage.affine_transform(
        np.asarray(array, dtype=np.float32),
        voxel_map[:3, :3],
        offset=voxel_map[:3, 3],
        output_shape=tuple(shape),
        order=order,
        cval=0.0,
    )
    return np.asarray(out, dtype=np.float32)


def load_series(
    source: str | Path | bytes,
    rules: SeriesRules | None = None,
    storage: Storage | None = None,
    limits: ServerLimits | None = None,
) -> dict[str, Series]:
    """Read every file of a study and pick the series of each channel.

    Args:
        source: A folder, a ``.zip`` (local or ``s3://``), an ``s3://`` prefix, or the bytes
            of a zip.
        rules: Series-to-channel rules (defaults: :class:`SeriesRules`).
        storage: Object store for ``s3://`` sources.
        limits: Bounds for a zip from an untrusted client (see :func:`read_study`).

    Returns:
        The series of each channel (images as read, pixels not decoded yet).

    Raises:
        DicomStudyError: If a file is unreadable, or a channel is missing or ambiguous.
    """
    where = _IN_MEMORY if isinstance(source, bytes) else str(source)
    files = _load(source, storage, limits)
    return _match(_group(files, where), rules or SeriesRules(), where)


def _check_size(
    grids: Mapping[str, _Grid], reference: str, where: str, limits: ServerLimits
) -> None:
    """Refuse, before any pixel is decoded, series larger than the server takes."""
    sent = sum(int(np.prod(g.shape)) for g in grids.values())
    case = len(CHANNELS) * int(np.prod(grids[reference].shape))
    for channel, grid in grids.items():
        if max(grid.shape) > limits.max_edge:
            raise DicomStudyError(
                f"{where}: the {channel} series is {'×'.join(map(str, grid.shape))} voxels; each "
                f"edge must be at most max_edge={limits.max_edge}"
            )
    if max(sent, case) > limits.max_case_voxels:
        raise DicomStudyError(
            f"{where}: the series hold {sent} voxels ({case} on the reference grid), above "
            f"max_case_voxels={limits.max_case_voxels}"
        )


def read_study(
    source: str | Path | bytes,
    rules: SeriesRules | None = None,
    storage: Storage | None = None,
    limits: ServerLimits | None = None,
) -> DicomStudy:
    """Read a DICOM study of the four MR series into the canonical case.

    Args:
        source: A folder, a ``.zip`` (local or ``s3://``), an ``s3://`` prefix, or the bytes
            of a zip.
        rules: Series-to-channel rules (defaults: :class:`SeriesRules`).
        storage: Object store for ``s3://`` sources.
        limits: For a zip from an untrusted client (the model server): its central directory
            is sized before it is parsed, its members' inflated sizes are summed before any is
            inflated (``max_decoded_bytes``), and the series' voxels are counted from their
            headers before any pixel is decoded (``max_case_voxels``, ``max_edge``).

    Returns:
        The case on the reference series' grid.

    Raises:
        DicomStudyError: If a file is unreadable, a channel is missing or ambiguous, a series
            is not a regular volume, or a limit is exceeded; the message lists the series found.
    """
    rules = rules or SeriesRules()
    where = _IN_MEMORY if isinstance(source, bytes) else str(source)
    chosen = load_series(source, rules, storage, limits)
    ref = chosen[rules.reference]
    grids = {c: _grid(chosen[c], where) for c in CHANNELS}
    if limits is not None:
        _check_size(grids, rules.reference, where, limits)
    frame_of_reference = ref.datasets[0].get("FrameOfReferenceUID")
    for s in chosen.values():
        if s.datasets[0].get("FrameOfReferenceUID") != frame_of_reference:
            raise DicomStudyError(
                f"{where}: {s.summary()} is in another frame of reference than the "
                f"reference series; register the series first"
            )
    target = grids[rules.reference]
    nx, ny, nz = target.shape
    # One buffer, channel by channel in (Z, Y, X) C order: the image is a view of it.
    buffer = np.empty((len(CHANNELS), nz, ny, nx), dtype=np.float32)
    resampled = []
    for c, channel in enumerate(CHANNELS):
        grid = grids[channel]
        if grid.same_as(target):
            _read_pixels(chosen[channel], grid, where, buffer[c])
            continue
        gx, gy, gz = grid.shape
        own = np.empty((gz, gy, gx), dtype=np.float32)
        _read_pixels(chosen[channel], grid, where, own)
        values = resample(own.transpose(2, 1, 0), grid.affine, target.shape, target.affine)
        buffer[c] = values.transpose(2, 1, 0)
        resampled.append(channel)
    return DicomStudy(
        image=buffer.transpose(0, 3, 2, 1),
        affine=target.affine,
        reference=[ref.datasets[i] for i in target.order],
        series_uids={name: s.uid for name, s in chosen.items()},
        resampled=resampled,
    )


def _study_uid(data: bytes | str) -> str | None:
    """The StudyInstanceUID of one file, or ``None`` when it is not DICOM."""
    try:
        src = io.BytesIO(data) if isinstance(data, bytes) else data
        ds = pydicom.dcmread(src, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
    except Exception:
        return None
    return str(ds.get("StudyInstanceUID", "")) or None


_NOT_DICOM = (".nii", ".nii.gz", ".json", ".csv", ".txt", ".md")


def find_studies(source: str | Path, storage: Storage | None = None) -> list[tuple[str, str]]:
    """The DICOM studies at ``source``, as ``(case id, study source)`` in name order.

    * a ``.zip`` is one study, named after the zip;
    * a folder or ``s3://`` prefix is one study, named after it, when DICOM files lie directly
      in it or when its sub-folders hold one study between them (one sub-folder per series);
    * otherwise every sub-folder or ``.zip`` in it that holds DICOM is a study, named after it
      (a batch; a single sub-folder is a batch of one).

    Only the first DICOM file of each sub-folder is opened (its header), so telling a study
    from a batch costs one read per sub-folder.

    Args:
        source: A folder, ``s3://`` prefix or ``.zip``.
        storage: Object store for ``s3://`` sources.

    Returns:
        The studies; empty when ``source`` holds no DICOM.
    """
    store = storage or Storage()
    base = str(source).rstrip("/")
    name = base.rsplit("/", 1)[-1]
    if base.lower().endswith(".zip"):
        return [(name[: -len(".zip")], base)]
    children: dict[str, list[str]] = {}
    direct: list[str] = []
    for obj in store.list(base):
        rel = obj.uri[len(base) + 1 :]
        head, sep, _ = rel.partition("/")
        if sep:
            children.setdefault(head, []).append(obj.uri)
        elif not rel.lower().endswith(_NOT_DICOM):
            direct.append(obj.uri)

    def read(uri: str) -> bytes | str:
        return store.get_bytes(uri) if is_s3(uri) else uri

    if any(_study_uid(read(uri)) for uri in direct):
        return [(name, base)]
    studies: list[tuple[str, str]] = []
    uids: set[str] = set()
    folders = 0
    for child in sorted(set(children) | {u.rsplit("/", 1)[-1] for u in direct}):
        if child.lower().endswith(".zip") and child not in children:
            studies.append((child[: -len(".zip")], f"{base}/{child}"))
            continue
        for uri in children.get(child, []):
            if uri.lower().endswith(_NOT_DICOM):
                continue
            uid = _study_uid(read(uri))
            if uid is not None:
                studies.append((child, f"{base}/{child}"))
                uids.add(uid)
                folders += 1
                break
    if folders >= 2 and len(uids) == 1 and folders == len(studies):
        return [(name, base)]  # series folders of one study
    return studies


# -- writing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyInfo:
    """Patient and study attributes shared by every series of a written study.

    Attributes:
        patient_id: PatientID.
        patient_name: PatientName (DICOM PN, ``FAMILY^GIVEN``).
        birth_date: PatientBirthDate (``YYYYMMDD``).
        sex: PatientSex.
        study_date: StudyDate (``YYYYMMDD``).
        accession: AccessionNumber.
        study_uid: StudyInstanceUID.
        frame_of_reference_uid: FrameOfReferenceUID shared by the series.
        institution: InstitutionName.
    """

    patient_id: str
    patient_name: str = "SYNTH^PATIENT"
    birth_date: str = "19700101"
    sex: str = "O"
    study_date: str = "20240101"
    accession: str = ""
    study_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    institution: str = "medseg synthetic hospital"


def _to_stored(
    volume: NDArray[np.floating] | NDArray[np.integer], rescale: tuple[float, float] | None
) -> tuple[NDArray[np.int16], float, float]:
    """Stored int16 values and (slope, intercept) such that ``slope * stored + intercept ≈ v``."""
    values = np.asarray(volume, dtype=np.float64)
    if rescale is None:
        if np.all(values == np.round(values)) and values.min() >= -32768 and values.max() <= 32767:
            rescale = (1.0, 0.0)
        else:
            lo, hi = float(values.min()), float(values.max())
            rescale = (max(hi - lo, 1e-6) / 65535.0, lo + 32768 * max(hi - lo, 1e-6) / 65535.0)
    slope, intercept = rescale
    stored = np.round((values - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError(f"rescale {rescale} does not fit the values in int16")
    return stored.astype(np.int16), float(slope), float(intercept)


def write_series(
    volume: NDArray[np.generic],
    affine: NDArray[np.float64],
    out: str | Path,
    study: StudyInfo,
    description: str,
    series_number: int,
    *,
    rescale: tuple[float, float] | None = None,
    reverse_instances: bool = False,
) -> list[Path]:
    """Write a ``[X, Y, Z]`` volume as a classic MR series, one file per slice.

    Args:
        volume: The voxels, on the grid of ``affine``.
        affine: Voxel-to-world (RAS, mm). Its first two columns must be orthogonal (they become
            ImageOrientationPatient); the third gives each slice's position.
        out: Folder to write into (created); files are named by a random SOPInstanceUID so
            that nothing can rely on file names.
        study: Patient and study attributes.
        description: SeriesDescription (and ProtocolName).
        series_number: SeriesNumber.
        rescale: ``(slope, intercept)`` to store with; by default 1 and 0 for integer values
            in the int16 range, else a linear map onto int16.
        reverse_instances: Number the instances against the slice position (InstanceNumber
            1 is the last slice), as scanners acquiring head-first do.

    Returns:
        The files written.

    Raises:
        ValueError: If the in-plane axes of ``affine`` are not orthogonal.
    """
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    col_vec, row_vec = lps[:3, 0], lps[:3, 1]
    spacing_x, spacing_y = float(np.linalg.norm(col_vec)), float(np.linalg.norm(row_vec))
    row_cos, col_cos = col_vec / spacing_x, row_vec / spacing_y
    if abs(float(np.dot(row_cos, col_cos))) > _GEOMETRY_TOL:
        raise ValueError("the affine's first two axes are not orthogonal; DICOM cannot store it")
    stored, slope, intercept = _to_stored(np.asarray(volume), rescale)
    nx, ny, nz = stored.shape
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    normal = np.cross(row_cos, col_cos)
    thickness = abs(float(np.dot(lps[:3, 2], normal)))
    paths = []
    for k in range(nz):
        position = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
        ds = _mr_image(study, series_uid, description, series_number)
        ds.InstanceNumber = nz - k if reverse_instances else k + 1
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [_ds(spacing_y), _ds(spacing_x)]  # row spacing, then column spacing
        ds.SliceThickness = _ds(thickness)
        ds.SpacingBetweenSlices = _ds(thickness)
        ds.SliceLocation = _ds(float(np.dot(position, normal)))
        ds.Rows, ds.Columns = ny, nx
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        ds.RescaleType = "US"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ds(value: float) -> str:
    """A DS value: at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.9g}"


def _mr_image(study: StudyInfo, series_uid: str, description: str, number: int) -> Dataset:
    """The attributes of one MR Image Storage instance, pixel module and geometry aside."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID = study.patient_name, study.patient_id
    ds.PatientBirthDate, ds.PatientSex = study.birth_date, study.sex
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study.study_uid, study.study_date, "120000"
    ds.StudyID, ds.AccessionNumber = "1", study.accession
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MRI brain tumour protocol"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series_uid, number, "MR"
    ds.SeriesDescription = ds.ProtocolName = description
    ds.SeriesDate, ds.ContentDate = study.study_date, study.study_date
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = study.frame_of_reference_uid, ""
    ds.Manufacturer, ds.InstitutionName = "medseg", study.institution
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
    ds.MRAcquisitionType, ds.EchoTrainLength = "3D", 1
    ds.RepetitionTime, ds.EchoTime = "2000", "20"
    ds.MagneticFieldStrength, ds.ImagingFrequency = "3", "127.7"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def write_study(
    image: NDArray[np.generic],
    affine: NDArray[np.float64],
    out: str | Path,
    study: StudyInfo,
    descriptions: Mapping[str, str],
    *,
    rescale: Mapping[str, tuple[float, float]] | None = None,
    reverse_instances: Sequence[str] = (),
    grids: Mapping[str, tuple[NDArray[np.generic], NDArray[np.float64]]] | None = None,
) -> dict[str, list[Path]]:
    """Write a ``[4, X, Y, Z]`` case as a study, one series per channel in ``descriptions``.

    Args:
        image: Channels in :data:`medseg.config.CHANNELS` order.
        affine: Voxel-to-world (RAS, mm) of ``image``.
        out: Study folder; each series goes into its own sub-folder.
        study: Patient and study attributes.
        descriptions: SeriesDescription of each channel to write (a channel left out is not
            written: a study with a missing series).
        rescale: Per channel ``(slope, intercept)`` to store with.
        reverse_instances: Channels numbered against slice position.
        grids: Per channel, a volume and affine to write instead of ``image[c]`` (a series
            acquired on another grid).

    Returns:
        The files written, per channel.
    """
    written = {}
    for number, (channel, description) in enumerate(descriptions.items(), start=1):
        volume, vol_affine = (grids or {}).get(channel, (image[CHANNELS.index(channel)], affine))
        written[channel] = write_series(
            volume,
            vol_affine,
            Path(out) / f"series{number:02d}",
            study,
            description,
            number,
            rescale=(rescale or {}).get(channel),
            reverse_instances=channel in reverse_instances,
        )
    return written
