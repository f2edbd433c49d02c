"""Batch prediction: a model over many raw cases, with the function the server uses.

The cases come from a dataset split (``NAME@VERSION``, ``validation``), a folder or ``s3://``
prefix in one of the public layouts (see :mod:`medseg.data.layouts`), one case folder, the files of
one case, or DICOM: one study (a folder, ``.zip`` or ``s3://`` prefix) or a folder or prefix of
studies (see :func:`medseg.dicom.series.find_studies`). One model stays loaded; a reader thread
fetches and decodes the next cases (a bounded queue of ``prefetch`` cases) while the current
one is segmented. Each case goes through
:func:`medseg.inference.infer.segment_case`, the function the model server calls, and its label map
(on the case's own grid, with its affine, in the source's label convention) is written. Under
``OUT``::

    labels/CASE.nii.gz     one label map per case
    volumes.csv            case, TC_ml, WT_ml, ET_ml
    volumes.json           the same table as JSON
    dicom/CASE/seg.dcm     for a DICOM study: the DICOM SEG over its reference series,
    dicom/CASE/sr.dcm      the TID 1500 volumes report, and
    dicom/CASE/volumes.json  the JSON sidecar (volumes, study and series UIDs)
    predictions.json       model, source, convention, every case written, every case that
                           failed with its file and reason (written last)

A case that cannot be read or segmented is listed with its reason and the others are still
written; :attr:`PredictResult.failed` says which. Every file is written atomically, and a case's
files only once all of them are encoded: a failed case leaves none of its outputs.
"""

from __future__ import annotations

import csv
import io
import json
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import MedsegConfig
from medseg.core.errors import DatasetError, MedsegError, ObjectNotFound
from medseg.core.settings import DEFAULT_STORE
from medseg.core.storage import Storage, is_s3, join
from medseg.data.layouts import LAYOUTS, detect_layout, discover_cases
from medseg.data.manifest import DatasetRef
from medseg.dicom.seg import encode_study
from medseg.dicom.series import DicomStudy, find_studies, read_study
from medseg.inference.classify import INDEX, dataset_images, image_sources, predict_images
from medseg.inference.infer import Segmenter, load_model, read_config, segment_case
from medseg.io.nifti import Volume, decode, encode_label_map
from medseg.tasks import get_convention, task_of
from medseg.tasks.brats import CHANNELS

__all__ = [
    "CaseError",
    "CaseFailure",
    "CaseInput",
    "CaseSource",
    "PredictResult",
    "dataset_source",
    "load_case",
    "model_output_uri",
    "path_source",
    "predict",
    "predict_cases",
    "segment_cases",
    "split_output_uri",
    "write_index",
]

#: The role of a DICOM study (folder, zip or prefix) in :attr:`CaseInput.files`.
STUDY = "study"
_AFFINE_TOL_MM = 1e-3
_NIFTI = (".nii.gz", ".nii")


class CaseError(MedsegError):
    """One case cannot be used; names the case, the file and the reason."""

    def __init__(self, case_id: str, file: str | None, reason: str):
        super().__init__(f"case {case_id}: {reason}")
        self.case_id, self.file, self.reason = case_id, file, reason


@dataclass
class CaseInput:
    """Where one raw case's files are.

    Attributes:
        case_id: The case's identifier.
        files: Role to URI or path: one 3D file per channel name, or ``image`` (4D, channels
            last), or ``study`` (a DICOM study); ``label`` when present.
        channel_index: For a 4D ``image``, the index of each canonical channel.
        missing: Expected files that are absent, by role.
    """

    case_id: str
    files: dict[str, str]
    channel_index: dict[str, int] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


@dataclass
class CaseSource:
    """The cases of one prediction run and what they are.

    Attributes:
        name: Where they come from (for the index and messages).
        cases: The cases, in order.
        convention: Label convention of the source (the label maps are written in it).
        dataset: ``NAME@VERSION`` for a dataset split.
        split: The split of ``dataset``.
    """

    name: str
    cases: list[CaseInput]
    convention: str
    dataset: str | None = None
    split: str | None = None


@dataclass
class CaseFailure:
    """A case that was not written, and why."""

    case_id: str
    file: str | None
    reason: str


@dataclass
class PredictResult:
    """What a prediction run wrote.

    Attributes:
        out: The output folder or prefix.
        cases: One row per written case: ``case_id``, ``key`` (under ``out``), ``volumes_ml``.
        failed: The cases that were not written.
        seconds: Wall time of the run.
    """

    out: str
    cases: list[dict[str, Any]]
    failed: list[CaseFailure]
    seconds: float


def model_output_uri(model_uri: str, *parts: str) -> str:
    """Where a model's outputs go: beside a run's ``model/`` (``runs/ID/…``), else inside it."""
    base = model_uri.rstrip("/")
    base = base[: -len("/model")] if base.endswith("/model") else base
    return join(base, *parts)


def split_output_uri(model_uri: str, source: CaseSource) -> str:
    """Where a model's predictions of a dataset split go by default (``NAME-VERSION-SPLIT``)."""
    name, _, version = (source.dataset or "").partition("@")
    return model_output_uri(model_uri, "predictions", f"{name}-{version}-{source.split}")


def dataset_source(storage: Storage, store: str, spec: str, split: str) -> CaseSource:
    """The cases of a stored dataset version's split (``train``, ``validation`` or ``all``).

    Raises:
        DatasetError: If the dataset does not exist or the split has no case.
    """
    ref = DatasetRef.resolve(storage, store, spec)
    manifest = ref.load(storage)
    entries = [c for c in manifest.cases if split == "all" or c.split == split]
    if not entries:
        raise DatasetError(f"dataset {ref} has no cases in split {split!r}")
    cases = [
        CaseInput(
            c.case_id,
            {f.role: join(ref.prefix, f.key) for f in c.files},
            dict(c.channel_index),
        )
        for c in entries
    ]
    return CaseSource(f"{ref}:{split}", cases, manifest.convention, str(ref), split)


def _stem(name: str) -> str:
    for ext in _NIFTI:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def path_source(
    storage: Storage, paths: Sequence[str], channels: Sequence[str] | None = None
) -> CaseSource:
    """Cases from local paths or ``s3://`` URIs.

    Args:
        storage: Reads ``s3://`` listings (and an MSD ``dataset.json``).
        paths: One folder or prefix in a public layout (every case in it), one case folder, one
            4D NIfTI, or four 3D NIfTI files of one case.
        channels: Channel order of one 4D file or four files (default: ``t1, t1gd, t2, flair``).

    Raises:
        MedsegError: If the paths are none of those.
    """
    order = list(channels or CHANNELS)
    if sorted(order) != sorted(CHANNELS):
        raise MedsegError(f"channels must name {', '.join(CHANNELS)}; got {','.join(order)}")
    if not paths:
        raise MedsegError("nothing to predict: give a dataset, a folder, a prefix or files")
    first = str(paths[0])
    if len(paths) == 1 and first.lower().endswith(".zip"):
        return _study_source(storage, first)
    if len(paths) > 1 or first.endswith(_NIFTI):
        if len(paths) not in (1, len(CHANNELS)):
            raise MedsegError(f"give one 4D NIfTI, four 3D files or a folder, not {len(paths)}")
        files = [str(p) for p in paths]
        missing = [f for f in files if not is_s3(f) and not Path(f).is_file()]
        if missing:
            raise MedsegError(f"no such file: {', '.join(missing)}")
        case_id = _stem(Path(files[0]).name)
        if len(files) == 1:
            case = CaseInput(case_id, {"image": files[0]}, {c: i for i, c in enumerate(order)})
        else:
            case = CaseInput(case_id, dict(zip(order, files, strict=True)))
        return CaseSource(first, [case], "brats2021")
    try:
        return _folder_source(storage, first)
    except MedsegError as exc:
        try:
            return _study_source(storage, first)
        except MedsegError:
            raise MedsegError(f"{exc}; nor does it hold DICOM studies") from None


def _study_source(storage: Storage, source: str) -> CaseSource:
    """The DICOM studies at ``source`` (label maps written in the BraTS 2021 convention)."""
    studies = find_studies(source, storage)
    if not studies:
        raise MedsegError(f"{source}: no DICOM study found")
    cases = [CaseInput(case_id, {STUDY: uri}) for case_id, uri in studies]
    return CaseSource(source, cases, "brats2021")


def _folder_source(storage: Storage, source: str) -> CaseSource:
    """Every case of a layout folder/prefix, or the one case of a case folder/prefix."""
    base = source.rstrip("/")
    listing = {o.uri[len(base) + 1 :]: o.uri for o in storage.list(base) if o.uri != base}
    if not listing:
        raise MedsegError(f"{source}: no such folder or prefix, or nothing in it")
    name = base.rsplit("/", 1)[-1] or "source"
    # The layout code reads folders: mirror the listing as empty files (dataset.json for real).
    with tempfile.TemporaryDirectory(prefix="medseg-predict-") as tmp:
        root = Path(tmp) / name
        for rel, uri in listing.items():
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if rel == "dataset.json":
                dest.write_bytes(storage.get_bytes(uri))
            else:
                dest.touch()
        try:
            layout = detect_layout(root)
            found = discover_cases(root, layout)
        except DatasetError as exc:
            try:  # the folder may be one case
                layout = detect_layout(root.parent)
                found = discover_cases(root.parent, layout)
            except DatasetError:
                raise MedsegError(str(exc)) from None
        if not found:
            raise MedsegError(f"{source}: layout {layout} detected but no case found")
        cases = []
        for raw in found:
            files = {r: listing[str(p.relative_to(root))] for r, p in raw.files().items()}
            cases.append(CaseInput(raw.case_id, files, dict(raw.channel_index), dict(raw.missing)))
    return CaseSource(source, cases, LAYOUTS[layout])


def _read(storage: Storage, case: CaseInput, role: str) -> Volume:
    uri = case.files[role]
    name = uri.rsplit("/", 1)[-1]
    try:
        data = storage.get_bytes(uri)
    except ObjectNotFound:
        raise CaseError(case.case_id, name, f"file {uri} does not exist") from None
    try:
        return decode(data, name)
    except MedsegError as exc:
        raise CaseError(case.case_id, name, str(exc)) from None


def load_case(
    storage: Storage, case: CaseInput, channels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Read and check a raw case's image.

    Args:
        storage: Storage to read with.
        case: The case.
        channels: Channel order wanted (a model's ``data.channels``).

    Returns:
        The image ``[4, X, Y, Z]`` (float32, in ``channels`` order) and its affine.

    Raises:
        CaseError: If a file is missing or unreadable, or the files do not fit together.
    """
    for role, expected in case.missing.items():
        if role != "label":
            raise CaseError(case.case_id, expected, f"missing modality {role}: no {expected}")
    if "image" in case.files:
        vol = _read(storage, case, "image")
        name = case.files["image"].rsplit("/", 1)[-1]
        if vol.data.ndim != 4 or vol.data.shape[3] != len(channels):
            raise CaseError(
                case.case_id,
                name,
                f"{name} has shape {vol.data.shape}, expected [X, Y, Z, {len(channels)}]",
            )
        image = np.stack([vol.data[..., case.channel_index[c]] for c in channels])
        affine, names = vol.affine, [name]
    else:
        vols = {c: _read(storage, case, c) for c in channels}
        names = [case.files[c].rsplit("/", 1)[-1] for c in channels]
        ref = vols[channels[0]]
        for c, name in zip(channels, names, strict=True):
            v = vols[c]
            if v.data.ndim != 3 or v.data.shape != ref.data.shape:
                raise CaseError(
                    case.case_id,
                    name,
                    f"{name} has shape {v.data.shape}, {names[0]} has {ref.data.shape}",
                )
            diff = float(np.abs(v.affine - ref.affine).max())
            if diff > _AFFINE_TOL_MM:
                raise CaseError(
                    case.case_id, name, f"{name}'s affine differs from {names[0]}'s by {diff:.3g}"
                )
        image = np.stack([vols[c].data for c in channels])
        affine = ref.affine
    if not np.isfinite(image).all():
        raise CaseError(case.case_id, None, f"NaN or Inf voxels in {', '.join(names)}")
    return image, affine


@dataclass
class _Loaded:
    image: np.ndarray
    affine: np.ndarray
    study: DicomStudy | None = None


def _load(storage: Storage, case: CaseInput, channels: Sequence[str]) -> _Loaded:
    """A case's image and affine; for a DICOM study, the study as read too."""
    if STUDY not in case.files:
        return _Loaded(*load_case(storage, case, channels))
    source = case.files[STUDY]
    try:
        study = read_study(source, storage=storage)
    except MedsegError as exc:
        raise CaseError(case.case_id, source, str(exc)) from None
    if not set(channels) <= set(CHANNELS):  # a study's series are BraTS's four modalities
        raise CaseError(case.case_id, source, f"a DICOM study has no channels {list(channels)}")
    order = [CHANNELS.index(c) for c in channels]
    return _Loaded(study.image[order], study.affine, study)


_Item = tuple[CaseInput, _Loaded | None, CaseFailure | None]


def _reader(
    storage: Storage,
    cases: Sequence[CaseInput],
    channels: Sequence[str],
    out: queue.Queue[_Item | None],
    stop: threading.Event,
) -> None:
    """Fetch and decode cases ahead of the compute, into the bounded queue ``out``."""

    def put(item: _Item | None) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    for case in cases:
        try:
            item: _Item = (case, _load(storage, case, channels), None)
        except CaseError as exc:
            item = (case, None, CaseFailure(case.case_id, exc.file, exc.reason))
        except MedsegError as exc:  # storage unreachable and the like
            item = (case, None, CaseFailure(case.case_id, None, str(exc)))
        except Exception as exc:  # a failure of one case must not lose the others
            item = (case, None, CaseFailure(case.case_id, None, f"{type(exc).__name__}: {exc}"))
        if not put(item):
            return
    put(None)


def predict_cases(
    seg: Segmenter,
    source: CaseSource,
    out: str,
    storage: Storage | None = None,
    labels: str | None = None,
    model: str = "",
    prefetch: int = 2,
    on_case: Callable[[str, str | None], None] | None = None,
) -> PredictResult:
    """Segment every case of ``source`` with one loaded model; write label maps and volumes.

    Args:
        seg: The loaded model.
        source: The cases.
        out: Output folder or ``s3://`` prefix (see the module docstring).
        storage: Storage to use; from the environment when omitted.
        labels: Label convention of the written maps (default: the source's).
        model: Names the model in the index.
        prefetch: Cases read ahead of the compute (bounds the memory held).
        on_case: Called after each case with its id and ``None``, or the failure reason.

    Returns:
        What was written and what failed.
    """
    storage = storage or Storage()
    convention = labels or source.convention
    started = time.perf_counter()
    rows, failed = segment_cases(seg, source, out, storage, convention, prefetch, on_case)
    write_index(storage, out, source, seg.cfg, model, convention, rows, failed)
    return PredictResult(out, rows, failed, time.perf_counter() - started)


def segment_cases(
    seg: Segmenter,
    source: CaseSource,
    out: str,
    storage: Storage,
    convention: str,
    prefetch: int = 2,
    on_case: Callable[[str, str | None], None] | None = None,
    on_done: Callable[[CaseInput, dict[str, Any] | None, CaseFailure | None], None] | None = None,
) -> tuple[list[dict[str, Any]], list[CaseFailure]]:
    """Segment and write every case of ``source``: the loop of :func:`predict_cases`.

    Args:
        seg: The loaded model.
        source: The cases.
        out: Output folder or prefix.
        storage: Storage to use.
        convention: Label convention of the written maps.
        prefetch: Cases read ahead of the compute.
        on_case: Called after each case with its id and ``None``, or the failure reason.
        on_done: Called after each case with the case and its row, or its failure.

    Returns:
        The rows of the written cases and the cases that failed, in ``source`` order.

    Raises:
        MedsegError: If ``convention`` is not a known label convention.
    """
    try:
        get_convention(convention)
    except ValueError as exc:
        raise MedsegError(str(exc)) from None
    channels = list(seg.cfg.data.channels)
    pending: queue.Queue[_Item | None] = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    thread = threading.Thread(
        target=_reader,
        args=(storage, source.cases, channels, pending, stop),
        name="medseg-predict-reader",
        daemon=True,
    )
    rows: list[dict[str, Any]] = []
    failed: list[CaseFailure] = []
    thread.start()
    try:
        while (item := pending.get()) is not None:
            case, loaded, failure = item
            row = None
            if loaded is not None:
                try:
                    row = _write_case(seg, storage, case.case_id, loaded, out, convention)
                    rows.append(row)
                except MedsegError as exc:
                    failure = CaseFailure(case.case_id, None, str(exc))
                except Exception as exc:
                    failure = CaseFailure(case.case_id, None, f"{type(exc).__name__}: {exc}")
            if failure is not None:
                failed.append(failure)
            if on_done is not None:
                on_done(case, row, failure)
            if on_case is not None:
                on_case(case.case_id, None if failure is None else failure.reason)
    finally:
        stop.set()
        thread.join()
    return rows, failed


def write_index(
    storage: Storage,
    out: str,
    source: CaseSource,
    cfg: MedsegConfig,
    model: str,
    convention: str,
    rows: list[dict[str, Any]],
    failed: list[CaseFailure],
) -> None:
    """Write the volume tables and then ``predictions.json`` (the commit) of a prediction run."""
    _write_tables(storage, out, rows, task_of(cfg).outputs.names)
    storage.put_json(
        join(out, INDEX),
        {
            "model": model,
            "source": source.name,
            "dataset": source.dataset,
            "split": source.split,
            "label_convention": convention,
            "channels": list(cfg.data.channels),
            "nesting": cfg.infer.nesting,
            "threshold": cfg.infer.threshold,
            "cases": rows,
            "failed": [asdict(f) for f in failed],
            "created_at": datetime.now(UTC).isoformat(),
        },
    )


def _write_case(
    seg: Segmenter,
    storage: Storage,
    case_id: str,
    loaded: _Loaded,
    out: str,
    convention: str,
) -> dict[str, Any]:
    image, affine = loaded.image, loaded.affine
    result = segment_case(seg, image, affine)
    key = f"labels/{case_id}.nii.gz"
    outputs = {key: encode_label_map(result.label_map(convention), affine)}
    row: dict[str, Any] = {"case_id": case_id, "key": key}
    if loaded.study is not None:
        answer = encode_study(loaded.study, result)
        keys = {k: f"dicom/{case_id}/{n}" for k, n in _DICOM_FILES.items()}
        outputs[keys["seg_key"]] = answer.seg
        outputs[keys["sr_key"]] = answer.report
        outputs[keys["sidecar_key"]] = json.dumps(answer.sidecar(), indent=2).encode()
        row.update(keys)
    infos = {k: storage.put_bytes(join(out, k), data) for k, data in outputs.items()}
    return {
        **row,
        "sha256": infos[key].sha256,
        "shape": list(image.shape[1:]),
        "volumes_ml": {r: round(v, 4) for r, v in result.volumes_ml.items()},
    }


#: The DICOM outputs of a study, under ``dicom/CASE/``, by their key in the index.
_DICOM_FILES = {"seg_key": "seg.dcm", "sr_key": "sr.dcm", "sidecar_key": "volumes.json"}


def _write_tables(
    storage: Storage, out: str, rows: list[dict[str, Any]], regions: Sequence[str]
) -> None:
    table = [
        {"case": r["case_id"], **{f"{k}_ml": v for k, v in r["volumes_ml"].items()}} for r in rows
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["case", *(f"{r}_ml" for r in regions)])
    writer.writeheader()
    writer.writerows(table)
    storage.put_bytes(join(out, "volumes.csv"), buf.getvalue().encode())
    storage.put_json(join(out, "volumes.json"), table)


def predict(
    model_uri: str,
    out: str | None = None,
    *,
    dataset: str | None = None,
    split: str = "validation",
    store: str = DEFAULT_STORE,
    paths: Sequence[str] = (),
    channels: Sequence[str] | None = None,
    labels: str | None = None,
    storage: Storage | None = None,
    segmenter: Segmenter | None = None,
    prefetch: int = 2,
    on_case: Callable[[str, str | None], None] | None = None,
) -> PredictResult:
    """Predict a dataset split, or the cases under ``paths``, with the model at ``model_uri``.

    Args:
        model_uri: A model artifact (see :mod:`medseg.inference.infer`).
        out: Output folder or prefix; for a dataset split by default
            ``runs/ID/predictions/NAME-VERSION-SPLIT`` beside the run's model.
        dataset: ``NAME@VERSION`` in ``store``; else ``paths`` are predicted.
        split: ``validation``, ``train`` or ``all`` (with ``dataset``).
        store: Root of the store holding ``dataset``.
        paths: See :func:`path_source`.
        channels: Channel order of files given in ``paths``.
        labels: Label convention of the written maps (default: the source's).
        storage: Storage to use; from the environment when omitted.
        segmenter: An already loaded model (``model_uri`` then only names it).
        prefetch: Cases read ahead of the compute.
        on_case: Progress callback, see :func:`predict_cases`.

    Raises:
        MedsegError: If the model or the source is unusable (a bad *case* is a failure in the
            result instead).
    """
    storage = storage or Storage()
    cfg = segmenter.cfg if segmenter is not None else read_config(model_uri, storage)
    if task_of(cfg).outputs.kind == "classes":
        seg = segmenter or load_model(model_uri, storage)
        return _predict_classes(seg, model_uri, out, dataset, split, store, paths, storage)
    if dataset:
        source = dataset_source(storage, store, dataset, split)
        out = out or split_output_uri(model_uri, source)
    else:
        source = path_source(storage, paths, channels)
        if out is None:
            raise MedsegError("give an output folder or prefix for predictions of files")
    seg = segmenter or load_model(model_uri, storage)
    return predict_cases(seg, source, out, storage, labels, model_uri, prefetch, on_case)


def _predict_classes(
    model: Segmenter,
    model_uri: str,
    out: str | None,
    dataset: str | None,
    split: str,
    store: str,
    paths: Sequence[str],
    storage: Storage,
) -> PredictResult:
    """Batch prediction of a classifier: a dataset split's images, or the images under ``paths``.

    Writes ``predictions.csv`` and ``predictions.json``
    (:func:`medseg.inference.classify.predict_images`); an image that does not decode is a failure
    of the result.
    """
    started = time.perf_counter()
    if dataset:
        ref = DatasetRef.resolve(storage, store, dataset)
        images = dataset_images(storage, store, str(ref), split)
        source = (str(ref), split)
        out = out or model_output_uri(model_uri, "predictions", f"{ref.name}-{ref.version}-{split}")
    else:
        if not paths:
            raise MedsegError("give a dataset or the folders/prefixes of images to predict")
        images = [found for p in paths for found in image_sources(storage, p)]
        source = ("", "")
        if out is None:
            raise MedsegError("give an output folder or prefix for predictions of files")
    written = predict_images(model, images, out, storage, source=source)
    uris = dict(images)
    failed = [CaseFailure(c, uris[c], reason) for c, reason in written.failures.items()]
    return PredictResult(out, written.cases, failed, time.perf_counter() - started)
