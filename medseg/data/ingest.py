"""Ingest: validate raw cases, quarantine bad ones, store the good ones as a dataset version.

Every case is checked before anything is written: all four modalities and the label map
present and readable, one shape and one affine across them, finite values, a non-empty brain,
labels within the convention. A bad case is quarantined with a reason that names the case, the
file and the problem; the run fails only when no valid case is left (or any is bad, with
``strict``). Identifying NIfTI header text (``descrip``, ``aux_file``, ``db_name``,
``intent_name``) is blanked in the stored copies. A file that is a symbolic link to somewhere
outside the source folder is not followed: its case is quarantined. The manifest is written
last: until it exists the version does not, so a crash never leaves a half-ingested version
visible, and a re-run uploads only what is missing.

Ingest reads the source twice and keeps no copy of a case on local disk in between, so its
scratch does not grow with the number of cases (a dermoscopy image's PNG is there only while it
is made). An ``s3://`` source of volumes (BraTS, MSD) is read the same way: its NIfTI files are
fetched when their case is read and emptied after, so its scratch is the cases being read, one
per worker (:class:`_Mirror`); DICOM studies and dermoscopy images from ``s3://`` are still
copied whole to local disk first. The version's name
is the hash of the whole manifest, so nothing can be uploaded before every case is validated:
the first pass validates each case and records the sha256 and size of its files as they will be
stored (de-identified); the second makes each case's stored bytes again from the source
(:func:`_upload_case`), checks them against that record and uploads them. Making them again
costs a second gzip of every de-identified NIfTI file (the whole conversion of a DICOM study or
an image). A source that changed between the passes fails the run with the case, the file and
the digests; the objects the run uploaded are removed again and no manifest is written, so
nothing is half-written.

DICOM studies (a folder or prefix of study folders or zips, see
:func:`medseg.dicom.series.find_studies`) go through the same checks: each study is read into the
canonical case (:func:`medseg.dicom.series.read_study`), its ground truth is a NIfTI label map in
the study folder (any grid; nearest-neighbour onto the reference grid) or a DICOM SEG in it (read
with highdicom onto the reference series), and it is stored as the four channels and the label
map in NIfTI (what preprocessing and evaluation read) plus ``CASE_study.zip``, the study
de-identified by :mod:`medseg.dicom.deid` (PS3.15 Basic Profile) with the key ``MEDSEG_DEID_KEY``,
which is never stored: nothing maps the pseudonyms back. A study that cannot be read, lacks a
series or its ground truth, or cannot be de-identified is quarantined with its reason.

Dermoscopy images (2D, one class per image: HAM10000, ISIC 2018 Task 3, or a folder per class;
see :mod:`medseg.data.skin_layouts`) go through the same steps: each image is checked and stored
de-identified (:mod:`medseg.data.skin_validate`: the pixels only, as PNG), one manifest entry per
image with its class (``label``) and its lesion (``group``), and the split is drawn over
lesions, so that no lesion has images on both sides.

Re-ingesting is keyed on content, never on the source's path: the source's fingerprint (every
file's relative path, size and sha256 for a folder; every object's key, size and ETag for an
``s3://`` prefix) and the ingest options map to the version they produced, in
``STORE/datasets/NAME/sources/KEY.json``. The same content again returns that version without
reading it twice; new or changed files under the same folder or prefix make a new version.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import hmac
import io
import json
import multiprocessing
import os
import tempfile
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from medseg.config import SplitConfig
from medseg.core.errors import DatasetError, InvalidName, MedsegError, ObjectNotFound
from medseg.core.names import check_name
from medseg.core.settings import DeidSettings
from medseg.core.storage import Storage, StorageSettings, is_s3, join, sha256_file
from medseg.data.layouts import LAYOUTS, RawCase, detect_layout, discover_cases
from medseg.data.manifest import CaseEntry, DatasetRef, FileEntry, Manifest, QuarantinedCase
from medseg.data.skin_layouts import RawImage, discover_images
from medseg.data.skin_layouts import detect_layout as detect_image_layout
from medseg.data.skin_validate import check_image
from medseg.dicom.deid import deidentify_files
from medseg.dicom.series import find_studies, read_study, resample
from medseg.io.nifti import GZIP_MAGIC, open_image, read_voxels
from medseg.tasks import skin_classes
from medseg.tasks.brats import CHANNELS
from medseg.tasks.labels import LabelConvention, get_convention

__all__ = ["IngestResult", "ingest", "source_fingerprint"]

# Workers start fresh (no forked torch/OpenMP state from the parent).
_SPAWN = multiprocessing.get_context("spawn")

#: Header fields that may carry identifying text (NIfTI-1 names; NIfTI-2 has all but db_name).
BLANKED_FIELDS = ("descrip", "aux_file", "db_name", "intent_name")
_AFFINE_TOL_MM = 1e-3


class CaseInvalid(Exception):
    """A case failed one check; carries the offending file."""

    def __init__(self, file: str | None, reason: str):
        super().__init__(reason)
        self.file = file
        self.reason = reason


@dataclass
class _Loaded:
    role: str
    name: str
    source: Path
    data: NDArray[np.generic]
    affine: NDArray[np.float64]
    zooms: tuple[float, ...]
    stored: bytes | None  # the file as it is stored (de-identified); None for a derived volume


@dataclass
class _Checked:
    """A case's manifest entry (split unset), or its quarantine."""

    case_id: str
    entry: CaseEntry | None = None
    quarantine: QuarantinedCase | None = None


#: A case's files as they are stored, by role.
_Files = dict[str, bytes]
_T = TypeVar("_T")


@dataclass
class IngestResult:
    """What an ingest run did.

    Attributes:
        ref: The dataset version.
        manifest: Its manifest.
        created: False when the identical version already existed (a no-op run).
        uploaded: Number of files uploaded in this run.
        cached: True when the source's content fingerprint was already known, so nothing
            was read beyond the fingerprint.
    """

    ref: DatasetRef
    manifest: Manifest
    created: bool
    uploaded: int
    cached: bool = False


def _open_nifti(path: Path) -> tuple[bytes, Any]:
    """A NIfTI file's bytes as stored (identifying header text blanked) and its image.

    The file is stored as it is when no field of :data:`BLANKED_FIELDS` has text; otherwise
    with those fields emptied, gzipped again if it was (level 6, no time stamp: the same file
    gives the same bytes every time). The voxels are not read.

    Raises:
        CaseInvalid: If the file cannot be read or is not NIfTI.
    """
    try:
        original = path.read_bytes()
        raw, img = open_image(original, path.name)
    except OSError as exc:
        raise CaseInvalid(path.name, f"{path.name} is unreadable: {exc.strerror or exc}") from None
    except MedsegError as exc:
        raise CaseInvalid(path.name, str(exc)) from None
    # The image's header has vox_offset reset by nibabel: edit the header exactly as stored.
    stored = type(img.header).from_fileobj(io.BytesIO(raw))
    present = [
        f for f in BLANKED_FIELDS if f in stored and bytes(stored[f].tobytes()).strip(b"\0 ")
    ]
    if not present:
        return original, img
    clean = stored.copy()
    for f in present:
        clean[f] = b""
    block = clean.binaryblock
    body = block + raw[len(block) :]
    if original[:2] == GZIP_MAGIC:
        return gzip.compress(body, compresslevel=6, mtime=0), img
    return body, img


def _read_nifti(path: Path, role: str) -> _Loaded:
    """Read one NIfTI file fully, and blank its identifying header text."""
    stored, img = _open_nifti(path)
    try:
        data = read_voxels(img, path.name, dtype=None)
    except MedsegError as exc:
        raise CaseInvalid(path.name, str(exc)) from None
    return _Loaded(
        role=role,
        name=path.name,
        source=path,
        data=data,
        affine=np.asarray(img.affine, dtype=np.float64),
        zooms=tuple(float(z) for z in img.header.get_zooms()),
        stored=stored,
    )


def _file_entry(role: str, key: str, data: bytes) -> FileEntry:
    """The manifest's record of one stored file."""
    return FileEntry(role=role, key=key, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _check_values(item: _Loaded) -> None:
    data = item.data
    if np.issubdtype(data.dtype, np.floating):
        nan = int(np.isnan(data).sum())
        inf = int(np.isinf(data).sum())
        if nan or inf:
            raise CaseInvalid(item.name, f"non-finite values in {item.name}: {nan} NaN, {inf} Inf")
    if not np.any(data):
        raise CaseInvalid(item.name, f"empty volume: {item.name} has no non-zero voxel")


def _check_label(item: _Loaded, conv: LabelConvention) -> dict[str, int]:
    values, counts = np.unique(item.data, return_counts=True)
    unknown = [v for v in values.tolist() if v not in conv.allowed]
    if unknown:
        shown = ", ".join(f"{v:g}" for v in unknown[:8])
        allowed = ", ".join(str(v) for v in sorted(conv.allowed))
        raise CaseInvalid(
            item.name,
            f"unknown label values [{shown}] in {item.name} "
            f"(convention {conv.name} allows {allowed})",
        )
    found = {int(v): int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)}
    return {str(v): found.get(v, 0) for v in sorted(conv.labels)}


def _check_case(case: RawCase, convention: str) -> _Checked:
    """Validate one case; returns its manifest entry (split unset) or its quarantine."""
    out = _Checked(case.case_id)
    try:
        out.entry = _validate(case, get_convention(convention))
    except CaseInvalid as exc:
        out.quarantine = QuarantinedCase(case_id=case.case_id, file=exc.file, reason=exc.reason)
    return out


def _case_files(case: RawCase, convention: str) -> _Files:
    """A validated case's files as stored, made again from its source (voxels not read)."""
    del convention  # the stored bytes do not depend on it; the same arguments as _check_case
    return {role: _open_nifti(path)[0] for role, path in case.files().items()}


def _validate(case: RawCase, conv: LabelConvention) -> CaseEntry:
    for role, expected in case.missing.items():
        what = "label map" if role == "label" else f"modality {role}"
        raise CaseInvalid(expected, f"missing {what}: expected file {expected}")
    loaded = [_read_nifti(path, role) for role, path in case.files().items()]
    ref = loaded[0]
    spatial = ref.data.shape[:3]
    for item in loaded:
        if item.role == "image":
            if item.data.ndim != 4 or item.data.shape[3] != len(CHANNELS):
                raise CaseInvalid(
                    item.name,
                    f"{item.name} has shape {item.data.shape}, expected 4D with 4 channels",
                )
        elif item.data.ndim != 3:
            raise CaseInvalid(item.name, f"{item.name} has shape {item.data.shape}, expected 3D")
        if item.data.shape[:3] != spatial:
            raise CaseInvalid(
                item.name,
                f"shape mismatch: {item.name} is {item.data.shape[:3]}, {ref.name} is {spatial}",
            )
        diff = float(np.abs(item.affine - ref.affine).max())
        if diff > _AFFINE_TOL_MM:
            raise CaseInvalid(
                item.name, f"affine mismatch: {item.name} differs from {ref.name} by {diff:.3g} mm"
            )
    label_counts: dict[str, int] = {}
    for item in loaded:
        if item.role == "label":
            label_counts = _check_label(item, conv)
        elif item.role == "image":
            for c in range(item.data.shape[3]):
                channel = _Loaded(
                    item.role,
                    f"{item.name}[channel {c}]",
                    item.source,
                    item.data[..., c],
                    item.affine,
                    item.zooms,
                    None,
                )
                _check_values(channel)
        else:
            _check_values(item)
    files = []
    for item in loaded:
        # MSD names image and label alike (imagesTr/X.nii.gz, labelsTr/X.nii.gz): keep the folder.
        rel = f"{item.source.parent.name}/{item.name}" if case.image4d else item.name
        assert item.stored is not None  # read from a file
        files.append(_file_entry(item.role, f"raw/{case.case_id}/{rel}", item.stored))
    return CaseEntry(
        case_id=case.case_id,
        split="train",
        files=files,
        channel_index=case.channel_index,
        shape=(int(spatial[0]), int(spatial[1]), int(spatial[2])),
        spacing=(ref.zooms[0], ref.zooms[1], ref.zooms[2]),
        orientation="".join(nib.aff2axcodes(ref.affine)),
        label_counts=label_counts,
    )


#: The manifest's layout of a dataset ingested from DICOM studies.
DICOM_LAYOUT = "dicom"
_DICOM_ROLE = "dicom"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same study zips to the same bytes


def _nifti_bytes(data: NDArray[np.generic], affine: NDArray[np.float64]) -> bytes:
    """A volume as gzipped NIfTI-1 bytes that depend on the voxels and affine only."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _study_label(source: Path, study: Any, conv: LabelConvention) -> NDArray[np.uint8]:
    """The study's ground truth on its reference grid: a NIfTI label map or a DICOM SEG."""
    from medseg.dicom.seg import read_seg_labels  # highdicom and torch: only when needed

    shape = tuple(int(n) for n in study.image.shape[1:])
    if source.is_dir():
        maps = sorted(p for p in source.rglob("*") if p.name.endswith((".nii.gz", ".nii")))
        if len(maps) > 1:
            names = ", ".join(p.name for p in maps)
            raise CaseInvalid(maps[1].name, f"several NIfTI label maps in the study: {names}")
        if maps:
            item = _read_nifti(maps[0], "label")
            if item.data.ndim != 3:
                raise CaseInvalid(
                    item.name, f"{item.name} has shape {item.data.shape}, expected 3D"
                )
            data = np.asarray(item.data)
            same = data.shape == shape and np.allclose(
                item.affine, study.affine, atol=_AFFINE_TOL_MM
            )
            if not same:
                data = resample(data.astype(np.float32), item.affine, shape, study.affine, order=0)
            return np.rint(data).astype(np.uint8) if data.dtype.kind == "f" else data
    try:
        label = read_seg_labels(source, study, conv)
    except (ValueError, MedsegError) as exc:
        raise CaseInvalid(None, f"ground truth SEG of study {source.name}: {exc}") from None
    if label is None:
        raise CaseInvalid(
            None, f"no ground truth in study {source.name}: no NIfTI label map and no DICOM SEG"
        )
    return label


def _study(case_id: str, source: str, convention: str, key: bytes) -> tuple[_Checked, _Files]:
    """Validate, convert and de-identify one DICOM study; its entry and files, or its quarantine."""
    out = _Checked(case_id)
    blobs: _Files = {}
    path = Path(source)
    try:
        try:
            study = read_study(path)
            _, files = deidentify_files(path, key)
        except MedsegError as exc:
            raise CaseInvalid(path.name, str(exc)) from None
        conv = get_convention(convention)
        affine = np.asarray(study.affine, dtype=np.float64)
        channels = [
            _Loaded(c, f"{case_id}_{c}.nii.gz", path, study.image[i], affine, (), None)
            for i, c in enumerate(CHANNELS)
        ]
        for item in channels:
            _check_values(item)
        label = _Loaded(
            "label",
            f"{case_id}_seg.nii.gz",
            path,
            _study_label(path, study, conv),
            affine,
            (),
            None,
        )
        counts = _check_label(label, conv)
        names: dict[str, str] = {}
        for item in [*channels, label]:
            data = item.data.astype(np.uint8) if item.role == "label" else item.data
            names[item.role] = item.name
            blobs[item.role] = _nifti_bytes(np.ascontiguousarray(data), affine)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
            for rel in sorted(files):
                archive.writestr(
                    zipfile.ZipInfo(rel, _ZIP_TIME), files[rel], compress_type=zipfile.ZIP_DEFLATED
                )
        names[_DICOM_ROLE] = f"{case_id}_study.zip"
        blobs[_DICOM_ROLE] = buf.getvalue()
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        nx, ny, nz = (int(n) for n in study.image.shape[1:])
        out.entry = CaseEntry(
            case_id=case_id,
            split="train",
            files=[
                _file_entry(role, f"raw/{case_id}/{names[role]}", data)
                for role, data in blobs.items()
            ],
            shape=(nx, ny, nz),
            spacing=(float(zooms[0]), float(zooms[1]), float(zooms[2])),
            orientation="".join(nib.aff2axcodes(affine)),
            label_counts=counts,
        )
    except CaseInvalid as exc:
        out.quarantine = QuarantinedCase(case_id=case_id, file=exc.file, reason=exc.reason)
        blobs = {}
    return out, blobs


def _image(raw: RawImage) -> tuple[_Checked, _Files]:
    """Validate and de-identify one dermoscopy image; its entry and file, or its quarantine.

    :func:`medseg.data.skin_validate.check_image` writes the PNG to a folder of this image's own,
    removed as soon as it is read.
    """
    with tempfile.TemporaryDirectory(prefix="medseg-image-") as tmp:
        done = check_image(raw, tmp)
        blobs = {role: path.read_bytes() for role, path in done.staged.items()}
    return _Checked(done.case_id, done.entry, done.quarantine), blobs


def _entry_of(made: tuple[_Checked, _Files]) -> _Checked:
    return made[0]


def _files_of(made: tuple[_Checked, _Files]) -> _Files:
    checked, blobs = made
    if checked.quarantine is not None:
        raise CaseInvalid(checked.quarantine.file, checked.quarantine.reason)
    return blobs


# The two passes of each kind of source take the same arguments: validate (an entry), and
# make the stored files again (see the module docstring).


def _check_study(case_id: str, source: str, convention: str, key: bytes) -> _Checked:
    return _entry_of(_study(case_id, source, convention, key))


def _study_files(case_id: str, source: str, convention: str, key: bytes) -> _Files:
    return _files_of(_study(case_id, source, convention, key))


def _check_image(raw: RawImage) -> _Checked:
    return _entry_of(_image(raw))


def _image_files(raw: RawImage) -> _Files:
    return _files_of(_image(raw))


def _screen(case_id: str, files: Iterable[Path], root: Path) -> QuarantinedCase | None:
    """Refuse, before reading anything, a case with a bad id or a file outside ``root``."""
    try:
        check_name(case_id, "case id")
    except InvalidName as exc:
        return QuarantinedCase(case_id=case_id, file=None, reason=str(exc))
    inside = root.resolve()
    for path in files:
        target = path.resolve()
        if not target.is_relative_to(inside):
            return QuarantinedCase(
                case_id=case_id,
                file=path.name,
                reason=f"{path.name} is a symbolic link to {target}, outside the source "
                f"folder {root}; links out of the source are not followed",
            )
    return None


def source_fingerprint(source: str, storage: Storage) -> list[tuple[str, int, str]]:
    """What the content of ``source`` is, without parsing it: one row per file or object.

    A folder gives ``(relative path, size, sha256)`` per file, and ``(relative path, -1,
    "symlink:TARGET")`` per symbolic link, which is never followed; an ``s3://`` prefix gives
    ``(relative key, size, ETag)`` from one listing.
    """
    if is_s3(source):
        base = source.rstrip("/") + "/"
        return [(o.uri[len(base) :], o.size, o.etag or "") for o in storage.list(source)]
    root = Path(source)
    rows = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                rows.append((rel, -1, f"symlink:{os.readlink(path)}"))
            elif name in files:
                rows.append((rel, path.stat().st_size, sha256_file(path)))
    return sorted(rows)


def _source_key(
    rows: list[tuple[str, int, str]], labels: str | None, split: SplitConfig, strict: bool
) -> str:
    """The key of a source's content plus the options that shape its version.

    A de-identification key shapes the version of a DICOM source: a keyed digest of it (which
    reveals nothing of the key) is part of the source key.
    """
    body: dict[str, Any] = {
        "files": rows,
        "labels": labels,
        "split": split.model_dump(mode="json"),
        "strict": strict,
    }
    secret = DeidSettings().key
    if secret is not None:
        key = secret.get_secret_value().encode()
        body["deid"] = hmac.new(key, b"medseg ingest source key", hashlib.sha256).hexdigest()[:16]
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def _assign_split(
    ids: list[str], split: SplitConfig, groups: dict[str, str] | None = None
) -> dict[str, str]:
    """A seeded train/validation split of ``ids``, drawn over their groups when given.

    With ``groups`` (case id → group, e.g. the lesion an image shows), whole groups go to one
    side, and ``split.val_fraction`` is a fraction of the groups: no group is on both sides.
    """
    group_of = groups or {i: i for i in ids}
    ordered = sorted({group_of[i] for i in ids})
    n_val = 0
    if len(ordered) >= 2 and split.val_fraction > 0:
        n_val = min(len(ordered) - 1, max(1, round(len(ordered) * split.val_fraction)))
    perm = np.random.default_rng(split.seed).permutation(len(ordered))
    val = {ordered[i] for i in perm[:n_val]}
    return {i: ("validation" if group_of[i] in val else "train") for i in sorted(ids)}


class _Workers:
    """Runs calls in this process, or in ``workers`` spawned processes kept for both passes."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def imap(
        self,
        fn: Callable[..., _T],
        items: list[tuple[Any, ...]],
        stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[_T]:
        """``fn(*a)`` for each ``a`` of ``items``, in order, each as it is done.

        In workers, at most two calls per worker are queued or running at a time. Once
        ``stop()`` is true no further call starts; those already started finish and are still
        yielded.
        """
        if self.workers <= 1 or len(items) <= 1:
            for a in items:
                if stop():
                    return
                yield fn(*a)
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=_SPAWN)
        todo = deque(items)
        ahead: deque[Future[_T]] = deque()
        while True:
            while todo and len(ahead) < 2 * self.workers and not stop():
                ahead.append(self._pool.submit(fn, *todo.popleft()))
            if not ahead:
                return
            yield ahead.popleft().result()


@dataclass
class _Upload:
    """What storing one case did: the objects it wrote, or why its files were not stored."""

    written: list[str]
    problem: str | None = None


def _upload_case(
    make: Callable[..., _Files],
    args: tuple[Any, ...],
    entry: CaseEntry,
    prefix: str,
    settings: StorageSettings,
) -> _Upload:
    """Make a validated case's stored files again, check them against ``entry``, upload them.

    Nothing of the case is uploaded unless every one of its files is the one validated. An
    object already at its key with the same sha256 (left by an interrupted run) is kept.

    Args:
        make: Makes the case's files from its source (``_case_files``, ``_study_files``...).
        args: Its arguments, the same that validated the case.
        entry: The case's entry, as validated.
        prefix: The version's prefix in the store.
        settings: The store's connection settings.
    """
    try:
        blobs = make(*args)
    except CaseInvalid as exc:
        what = exc.file or "its source"
        return _Upload([], f"case {entry.case_id}, {what}: no longer valid: {exc.reason}")
    for f in entry.files:
        data = blobs.get(f.role)
        digest = None if data is None else hashlib.sha256(data).hexdigest()
        if digest != f.sha256:
            now = "missing" if digest is None else f"now {digest[:12]}…"
            return _Upload(
                [],
                f"case {entry.case_id}, {f.key.split('/', 2)[-1]}: changed since it was "
                f"validated (sha256 {f.sha256[:12]}…, {now})",
            )
    storage = Storage(settings)
    written = []
    for f in entry.files:
        uri = join(prefix, f.key)
        if storage.exists(uri) and storage.stat(uri).sha256 == f.sha256:
            continue  # left by an interrupted earlier run, with the very same bytes
        storage.put_bytes(uri, blobs[f.role])
        written.append(uri)
    return _Upload(written)


def _deid_key() -> bytes:
    """The de-identification key, from the environment only (never stored).

    Raises:
        DatasetError: If ``MEDSEG_DEID_KEY`` is not set.
    """
    secret = DeidSettings().key
    if secret is None or not secret.get_secret_value():
        raise DatasetError(
            "ingesting DICOM studies de-identifies them: set MEDSEG_DEID_KEY (a secret kept "
            "outside the dataset bucket, e.g. in a Kubernetes Secret)"
        )
    return secret.get_secret_value().encode()


def ingest(
    source: str,
    name: str,
    store: str,
    storage: Storage | None = None,
    labels: str | None = None,
    split: SplitConfig | None = None,
    strict: bool = False,
    workers: int = 1,
) -> IngestResult:
    """Validate and store a raw dataset as a content-addressed version.

    Args:
        source: Local folder or ``s3://`` prefix holding one public layout (volumes or
            dermoscopy images), or DICOM studies (de-identified on the way in: needs
            ``MEDSEG_DEID_KEY``).
        name: Dataset name.
        store: Root URI of the platform's store (e.g. ``s3://medseg``).
        storage: Storage to use; from the environment when omitted.
        labels: Label convention override (``brats2021``, ``brats2023``, ``msd``).
        split: Train/validation split settings.
        strict: Fail if any case is quarantined.
        workers: Processes that validate cases in parallel.

    Returns:
        The version, its manifest, and whether this run created it.

    Raises:
        InvalidName: If ``name`` breaks the naming rule of :mod:`medseg.core.names`.
        DatasetError: If the source is unusable, no valid case is left, or ``strict`` and a case
            was quarantined.
        DiskFull: If the local scratch folder runs out of space.
    """
    check_name(name, "dataset name")
    storage = storage or Storage()
    split = split or SplitConfig()
    if not is_s3(source) and not Path(source).is_dir():
        raise DatasetError(f"dataset source {source} is not a folder")
    rows = source_fingerprint(source, storage)
    key = _source_key(rows, labels, split, strict)
    record = join(store, "datasets", name, "sources", f"{key}.json")
    if storage.exists(record):
        ref = DatasetRef(store=store, name=name, version=storage.get_json(record)["version"])
        if storage.exists(ref.manifest_uri):
            return IngestResult(ref, ref.load(storage), created=False, uploaded=0, cached=True)
    result = _ingest(source, name, store, storage, labels, split, strict, workers)
    storage.put_json(record, {"version": result.ref.version, "files": len(rows)})
    return result


def _ingest(
    source: str,
    name: str,
    store: str,
    storage: Storage,
    labels: str | None,
    split: SplitConfig,
    strict: bool,
    workers: int,
) -> IngestResult:
    """Read, validate and store ``source`` (see :func:`ingest`)."""
    with (
        tempfile.TemporaryDirectory(prefix="medseg-ingest-") as tmp,
        _Workers(workers) as pool,
    ):
        root, mirror = _local_source(source, storage, Path(tmp))
        image_layout = detect_image_layout(root)
        if image_layout is not None:
            if mirror is not None:
                mirror.fetch_all()
            passes = _validate_images(source, root, image_layout, labels, pool)
        else:
            passes = _validate_volumes(source, root, labels, pool, mirror)
        return _store(source, name, store, storage, split, strict, passes)


def _local_source(source: str, storage: Storage, tmp: Path) -> tuple[Path, _Mirror | None]:
    """The source as a local folder: itself, or an ``s3://`` prefix mirrored into ``tmp``."""
    if not is_s3(source):
        return Path(source), None
    mirror = _Mirror.make(source, storage, tmp / "source")
    return mirror.root, mirror


#: The files of an ``s3://`` source that :class:`_Mirror` fetches only while their case is read.
_STREAMED = (".nii", ".nii.gz")


@dataclass(frozen=True)
class _Mirror:
    """An ``s3://`` source as a local folder whose NIfTI volumes are there only while read.

    Every other object (``dataset.json``, CSV files, DICOM files) is fetched at once. Each
    volume starts as an empty placeholder, so that the layouts find their cases by name;
    :meth:`present` fetches a case's files for the call that reads them and empties them after.

    Attributes:
        source: The ``s3://`` prefix.
        root: The local folder standing for it.
        settings: The store's connection settings (a worker process makes its own client).
    """

    source: str
    root: Path
    settings: StorageSettings

    @classmethod
    def make(cls, source: str, storage: Storage, root: Path) -> _Mirror:
        """List ``source`` into ``root``: small files fetched, volumes as placeholders."""
        base = source.rstrip("/") + "/"
        for obj in storage.list(source):
            path = root / obj.uri[len(base) :]
            if path.name.endswith(_STREAMED):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                storage.get_file(obj.uri, path)
        return cls(base.rstrip("/"), root, storage.settings)

    def _fetch(self, storage: Storage, path: Path) -> None:
        uri = join(self.source, path.relative_to(self.root).as_posix())
        try:
            storage.get_file(uri, path)
        except ObjectNotFound:
            raise CaseInvalid(path.name, f"{uri} was removed after it was listed") from None

    @contextlib.contextmanager
    def present(self, paths: Iterable[Path]) -> Iterator[None]:
        """``paths`` fetched for the duration of the block, emptied after it.

        Raises:
            CaseInvalid: If one of them is no longer in the source.
        """
        paths = list(paths)
        storage = Storage(self.settings)
        try:
            for path in paths:
                self._fetch(storage, path)
            yield
        finally:
            for path in paths:
                path.write_bytes(b"")

    def fetch_all(self) -> None:
        """Fetch every placeholder (a source that is not read case by case: DICOM, images)."""
        storage = Storage(self.settings)
        for folder, _, files in os.walk(self.root):
            for name in files:
                path = Path(folder) / name
                if name.endswith(_STREAMED) and path.stat().st_size == 0:
                    self._fetch(storage, path)


def _check_fetched(mirror: _Mirror, case: RawCase, convention: str) -> _Checked:
    """:func:`_check_case` with the case's files fetched from the mirrored source meanwhile."""
    try:
        with mirror.present(case.files().values()):
            return _check_case(case, convention)
    except CaseInvalid as exc:
        quarantine = QuarantinedCase(case_id=case.case_id, file=exc.file, reason=exc.reason)
        return _Checked(case.case_id, quarantine=quarantine)


def _files_fetched(mirror: _Mirror, case: RawCase, convention: str) -> _Files:
    """:func:`_case_files` with the case's files fetched from the mirrored source meanwhile."""
    with mirror.present(case.files().values()):
        return _case_files(case, convention)


@dataclass
class _Passes:
    """The first pass's results, and what the second needs: how to make each case's files.

    Attributes:
        kind: The manifest's layout, label convention and channels.
        n_cases: How many cases the source listed (for the message when none is valid).
        refused: Cases quarantined before validation.
        checked: Each validated case's entry or quarantine.
        make: Makes a case's stored files from its source (the second pass).
        args: Each validated case's arguments, as for the first pass.
        pool: The workers of both passes.
    """

    kind: tuple[str, str, tuple[str, ...]]
    n_cases: int
    refused: list[QuarantinedCase]
    checked: list[_Checked]
    make: Callable[..., _Files]
    args: list[tuple[Any, ...]]
    pool: _Workers


def _validate_images(
    source: str, root: Path, layout: str, labels: str | None, pool: _Workers
) -> _Passes:
    """The first pass over a dermoscopy dataset in ``layout``: each image checked."""
    if labels not in (None, skin_classes.CONVENTION):
        raise DatasetError(
            f"{source}: a {layout} dataset has the {skin_classes.CONVENTION} "
            f"classes, not the label convention {labels!r}"
        )
    raws = discover_images(root, layout)
    if not raws:
        raise DatasetError(f"{source}: layout {layout} detected but no image found")
    screens = [_screen(r.image_id, [r.path] if r.path else [], root) for r in raws]
    refused = [q for q in screens if q is not None]
    todo = [(r,) for r, q in zip(raws, screens, strict=True) if q is None]
    images = list(pool.imap(_check_image, todo))
    kind = (layout, skin_classes.CONVENTION, skin_classes.CHANNELS)
    return _Passes(kind, len(raws), refused, images, _image_files, todo, pool)


def _validate_volumes(
    source: str, root: Path, labels: str | None, pool: _Workers, mirror: _Mirror | None
) -> _Passes:
    """The first pass over a volume layout (BraTS, MSD) or DICOM studies: each case checked.

    A mirrored ``s3://`` source's volumes are fetched case by case (DICOM studies at once).
    """
    try:
        layout = detect_layout(root)
    except DatasetError as exc:
        if mirror is not None:
            mirror.fetch_all()
        studies = find_studies(root)
        if not studies:
            raise DatasetError(f"{exc}; nor does it hold DICOM studies") from None
        return _validate_studies(studies, labels, pool)
    convention = labels or LAYOUTS[layout]
    get_convention(convention)
    cases = discover_cases(root, layout)
    if not cases:
        raise DatasetError(f"{source}: layout {layout} detected but no case found")
    screened = {c.case_id: _screen(c.case_id, c.files().values(), root) for c in cases}
    refused = [q for q in screened.values() if q is not None]
    args = [(c, convention) for c in cases if screened[c.case_id] is None]
    check: Callable[..., _Checked] = _check_case
    make: Callable[..., _Files] = _case_files
    if mirror is not None:
        check = functools.partial(_check_fetched, mirror)
        make = functools.partial(_files_fetched, mirror)
    checked = list(pool.imap(check, args))
    kind = (layout, convention, CHANNELS)
    return _Passes(kind, len(cases), refused, checked, make, args, pool)


def _validate_studies(
    studies: list[tuple[str, str]], labels: str | None, pool: _Workers
) -> _Passes:
    """The first pass over DICOM studies: each study read, checked and de-identified."""
    convention = labels or "brats2021"
    get_convention(convention)
    key = _deid_key()
    refused = []
    readable = []
    for case_id, study in studies:
        try:
            check_name(case_id, "case id")
            readable.append((case_id, study, convention, key))
        except InvalidName as exc:
            refused.append(QuarantinedCase(case_id=case_id, file=None, reason=str(exc)))
    checked = list(pool.imap(_check_study, readable))
    kind = (DICOM_LAYOUT, convention, CHANNELS)
    return _Passes(kind, len(studies), refused, checked, _study_files, readable, pool)


def _store(
    source: str,
    name: str,
    store: str,
    storage: Storage,
    split: SplitConfig,
    strict: bool,
    passes: _Passes,
) -> IngestResult:
    """Split the valid cases, upload them and commit the version with its manifest.

    Args:
        source: The source, as given (for messages).
        name: Dataset name.
        store: Root URI of the platform's store.
        storage: Storage to use.
        split: Train/validation split settings.
        strict: Fail if any case is quarantined.
        passes: The first pass's results, and how to make each valid case's files again.

    Raises:
        DatasetError: If no valid case is left, or ``strict`` and a case was quarantined, or a
            file changed in the source after it was validated (nothing is committed then, and
            what this run uploaded is removed again).
    """
    manifest = _manifest(source, name, split, strict, passes)
    version = manifest.content_hash()
    ref = DatasetRef(store=store, name=name, version=version)
    if storage.exists(ref.manifest_uri):
        existing = ref.load(storage)
        return IngestResult(ref, existing, created=False, uploaded=0)
    uploaded = _upload(source, storage, ref, passes)
    manifest = manifest.model_copy(
        update={"version": version, "created_at": datetime.now(UTC).isoformat()}
    )
    storage.put_json(ref.manifest_uri, manifest.model_dump(mode="json"))
    storage.put_json(join(store, "datasets", name, "latest.json"), {"version": version})
    return IngestResult(ref, manifest, created=True, uploaded=uploaded)


def _manifest(
    source: str, name: str, split: SplitConfig, strict: bool, passes: _Passes
) -> Manifest:
    """The version's manifest (unversioned): the valid cases split, the others quarantined.

    Raises:
        DatasetError: If no valid case is left, or ``strict`` and a case was quarantined.
    """
    good = [c.entry for c in passes.checked if c.entry is not None]
    bad = passes.refused + [c.quarantine for c in passes.checked if c.quarantine is not None]
    bad.sort(key=lambda q: q.case_id)
    if not good:
        reasons = "; ".join(f"{q.case_id}: {q.reason}" for q in bad[:5])
        raise DatasetError(f"{source}: no valid case among {passes.n_cases} ({reasons})")
    if strict and bad:
        reasons = "; ".join(f"{q.case_id}: {q.reason}" for q in bad)
        raise DatasetError(f"{source}: {len(bad)} invalid cases with --strict ({reasons})")
    groups = {e.case_id: e.group or e.case_id for e in good}
    splits = _assign_split([e.case_id for e in good], split, groups)
    layout, convention, channels = passes.kind
    return Manifest(
        name=name,
        layout=layout,
        convention=convention,
        channels=channels,
        split_seed=split.seed,
        val_fraction=split.val_fraction,
        cases=[e.model_copy(update={"split": splits[e.case_id]}) for e in good],
        quarantined=bad,
    )


def _upload(source: str, storage: Storage, ref: DatasetRef, passes: _Passes) -> int:
    """The second pass: make every valid case's files again, check and upload them.

    Returns:
        How many files this run uploaded.

    Raises:
        DatasetError: If a file changed in the source after it was validated; what this run
            uploaded is removed again.
    """
    jobs = [
        (passes.make, a, c.entry, ref.prefix, storage.settings)
        for a, c in zip(passes.args, passes.checked, strict=True)
        if c.entry is not None
    ]
    written: list[str] = []
    changed: list[str] = []
    for done in passes.pool.imap(_upload_case, jobs, stop=lambda: bool(changed)):
        written += done.written
        if done.problem is not None:
            changed.append(done.problem)
    if changed:
        for uri in written:  # this run's objects of a version that will never be committed
            storage.delete(uri)
        raise DatasetError(
            f"{source} changed while it was ingested: {'; '.join(changed)}. Nothing was "
            f"committed and the {len(written)} files this run had uploaded were removed; "
            "ingest it again once it no longer changes"
        )
    return len(written)
