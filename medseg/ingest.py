"""Ingest: validate raw cases, quarantine bad ones, store the good ones as a dataset version.

Every case is checked before anything is written: all four modalities and the label map
present and readable, one shape and one affine across them, finite values, a non-empty brain,
labels within the convention. A bad case is quarantined with a reason that names the case, the
file and the problem; the run fails only when no valid case is left (or any is bad, with
``strict``). Identifying NIfTI header text (``descrip``, ``aux_file``, ``db_name``,
``intent_name``) is blanked in the stored copies. The manifest is written last: until it
exists the version does not, so a crash never leaves a half-ingested version visible, and a
re-run uploads only what is missing.
"""

from __future__ import annotations

import gzip
import io
import multiprocessing
import tempfile
import zlib
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from medseg.config import CHANNELS, SplitConfig
from medseg.errors import DatasetError
from medseg.labels import LabelConvention, get_convention
from medseg.layouts import LAYOUTS, RawCase, detect_layout, discover_cases
from medseg.manifest import CaseEntry, DatasetRef, FileEntry, Manifest, QuarantinedCase
from medseg.storage import Storage, check_name, is_s3, join, sha256_file

__all__ = ["IngestResult", "ingest"]

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
    sanitized: bytes | None  # new bytes when the header had text to blank, else None


@dataclass
class _Checked:
    case_id: str
    entry: CaseEntry | None = None
    quarantine: QuarantinedCase | None = None
    staged: dict[str, Path] = field(default_factory=dict)  # role -> file to upload


@dataclass
class IngestResult:
    """What an ingest run did.

    Attributes:
        ref: The dataset version.
        manifest: Its manifest.
        created: False when the identical version already existed (a no-op run).
        uploaded: Number of files uploaded in this run.
    """

    ref: DatasetRef
    manifest: Manifest
    created: bool
    uploaded: int


def _read_nifti(path: Path, role: str) -> _Loaded:
    """Read one NIfTI file fully, and blank its identifying header text."""
    raw = path.read_bytes()
    compressed = raw[:2] == b"\x1f\x8b"
    if compressed:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise CaseInvalid(path.name, f"corrupt gzip in {path.name}: {exc}") from None
    img: nib.Nifti1Image | nib.Nifti2Image | None = None
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            img = cls.from_bytes(raw)
            break
        except Exception:
            continue
    if img is None:
        raise CaseInvalid(path.name, f"{path.name} is not a readable NIfTI-1/2 file")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise CaseInvalid(path.name, f"{path.name}: voxel data unreadable ({exc})") from None
    header = img.header
    # The image's header has vox_offset reset by nibabel: edit the header exactly as stored.
    stored = type(header).from_fileobj(io.BytesIO(raw))
    sanitized = None
    present = [
        f for f in BLANKED_FIELDS if f in stored and bytes(stored[f].tobytes()).strip(b"\0 ")
    ]
    if present:
        clean = stored.copy()
        for f in present:
            clean[f] = b""
        block = clean.binaryblock
        body = block + raw[len(block) :]
        sanitized = gzip.compress(body, compresslevel=6, mtime=0) if compressed else body
    return _Loaded(
        role=role,
        name=path.name,
        source=path,
        data=data,
        affine=np.asarray(img.affine, dtype=np.float64),
        zooms=tuple(float(z) for z in header.get_zooms()),
        sanitized=sanitized,
    )


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


def _check_case(case: RawCase, convention: str, staging: str) -> _Checked:
    """Validate one case; returns its manifest entry (split unset) or its quarantine."""
    out = _Checked(case.case_id)
    try:
        out.entry, out.staged = _validate(case, get_convention(convention), Path(staging))
    except CaseInvalid as exc:
        out.quarantine = QuarantinedCase(case_id=case.case_id, file=exc.file, reason=exc.reason)
    return out


def _validate(
    case: RawCase, conv: LabelConvention, staging: Path
) -> tuple[CaseEntry, dict[str, Path]]:
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
    staged: dict[str, Path] = {}
    files = []
    for item in loaded:
        # MSD names image and label alike (imagesTr/X.nii.gz, labelsTr/X.nii.gz): keep the folder.
        rel = f"{item.source.parent.name}/{item.name}" if case.image4d else item.name
        if item.sanitized is not None:
            dest = staging / case.case_id / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(item.sanitized)
        else:
            dest = item.source
        staged[item.role] = dest
        files.append(
            FileEntry(
                role=item.role,
                key=f"raw/{case.case_id}/{rel}",
                sha256=sha256_file(dest),
                size=dest.stat().st_size,
            )
        )
    entry = CaseEntry(
        case_id=case.case_id,
        split="train",
        files=files,
        channel_index=case.channel_index,
        shape=(int(spatial[0]), int(spatial[1]), int(spatial[2])),
        spacing=(ref.zooms[0], ref.zooms[1], ref.zooms[2]),
        orientation="".join(nib.aff2axcodes(ref.affine)),
        label_counts=label_counts,
    )
    return entry, staged


def _assign_split(ids: list[str], split: SplitConfig) -> dict[str, str]:
    ordered = sorted(ids)
    n_val = 0
    if len(ordered) >= 2 and split.val_fraction > 0:
        n_val = min(len(ordered) - 1, max(1, round(len(ordered) * split.val_fraction)))
    perm = np.random.default_rng(split.seed).permutation(len(ordered))
    val = {ordered[i] for i in perm[:n_val]}
    return {i: ("validation" if i in val else "train") for i in ordered}


def _map(fn_args: Iterable[tuple[RawCase, str, str]], workers: int) -> list[_Checked]:
    items = list(fn_args)
    if workers <= 1 or len(items) <= 1:
        return [_check_case(*a) for a in items]
    with ProcessPoolExecutor(max_workers=workers, mp_context=_SPAWN) as pool:
        return list(pool.map(_check_case, *zip(*items, strict=True)))


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
        source: Local folder or ``s3://`` prefix holding one public layout.
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
        DatasetError: If the source is unusable, no valid case is left, or ``strict`` and a case
            was quarantined.
    """
    check_name("dataset name", name)
    storage = storage or Storage()
    split = split or SplitConfig()
    with tempfile.TemporaryDirectory(prefix="medseg-ingest-") as tmp:
        root = Path(source)
        if is_s3(source):
            root = Path(tmp) / "source"
            for obj in storage.list(source):
                storage.get_file(obj.uri, root / obj.uri[len(source.rstrip("/")) + 1 :])
        layout = detect_layout(root)
        convention = labels or LAYOUTS[layout]
        get_convention(convention)
        cases = discover_cases(root, layout)
        if not cases:
            raise DatasetError(f"{source}: layout {layout} detected but no case found")
        staging = str(Path(tmp) / "staged")
        checked = _map(((c, convention, staging) for c in cases), workers)
        good = [c for c in checked if c.entry is not None]
        bad = [c.quarantine for c in checked if c.quarantine is not None]
        if not good:
            reasons = "; ".join(f"{q.case_id}: {q.reason}" for q in bad[:5])
            raise DatasetError(f"{source}: no valid case among {len(cases)} ({reasons})")
        if strict and bad:
            reasons = "; ".join(f"{q.case_id}: {q.reason}" for q in bad)
            raise DatasetError(f"{source}: {len(bad)} invalid cases with --strict ({reasons})")
        splits = _assign_split([c.case_id for c in good], split)
        entries = []
        for c in good:
            assert c.entry is not None
            entries.append(c.entry.model_copy(update={"split": splits[c.case_id]}))
        manifest = Manifest(
            name=name,
            layout=layout,
            convention=convention,
            channels=CHANNELS,
            split_seed=split.seed,
            val_fraction=split.val_fraction,
            cases=entries,
            quarantined=bad,
        )
        version = manifest.content_hash()
        ref = DatasetRef(store=store, name=name, version=version)
        if storage.exists(ref.manifest_uri):
            existing = ref.load(storage)
            return IngestResult(ref, existing, created=False, uploaded=0)
        uploaded = 0
        for c in good:
            assert c.entry is not None
            for f in c.entry.files:
                uri = join(ref.prefix, f.key)
                if storage.exists(uri) and storage.stat(uri).sha256 in (f.sha256, None):
                    continue  # left by an interrupted earlier run; content-addressed, so equal
                storage.put_file(uri, c.staged[f.role])
                uploaded += 1
        manifest = manifest.model_copy(
            update={"version": version, "created_at": datetime.now(UTC).isoformat()}
        )
        storage.put_json(ref.manifest_uri, manifest.model_dump(mode="json"))
        storage.put_json(join(store, "datasets", name, "latest.json"), {"version": version})
        return IngestResult(ref, manifest, created=True, uploaded=uploaded)
