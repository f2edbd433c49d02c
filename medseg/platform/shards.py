"""Data-parallel preprocess and batch predict: K shards of the cases, then one collect.

A step that runs per case (preprocess, predict) runs as ``shards`` independent shards, one pod
each on a cluster (a KFP ``ParallelFor``), and a collect step then writes the one commit the
unsharded step writes: ``index.json`` of the preprocessing, ``predictions.json`` (and the
volume tables) of a prediction run, with the same content.

**Assignment** (:func:`assign`): sorted round-robin by case id. The ids are sorted, and the
``i``-th goes to shard ``i mod K``: deterministic, independent of the manifest's order, and
balanced (shard sizes differ by at most one). Adding cases may move others to another shard;
that costs nothing, since what a shard finds done is keyed on content, not on the shard.

**Staging and resume.** A shard writes each case's outputs where the unsharded step writes
them, then a small record of the case under ``parts/`` beside them (written last, atomically):

* preprocess: ``PREFIX/parts/CASE.json`` holds the case's ``index.json`` entry. ``PREFIX`` is
  already keyed on content (the dataset version is its manifest's content hash, then the data
  config's fingerprint), so a record there means the case is done.
* predict: ``OUT/parts/CASE.json`` holds the case's ``predictions.json`` row (or its failure)
  and :func:`case_key`, a sha256 of the model's ``model.pt`` and ``model.yaml``, the case's raw
  files (their sha256 in the manifest) and the label convention. A case is done when its record
  holds a row under the same key.

A shard killed part-way leaves the cases it finished; run again, it does only the rest. The
collect step reads one record per case and fails, naming the shard and its missing cases, when
any is absent: it never writes a partial commit, and the commit itself is one atomic write.
:func:`clean_shard` removes a shard's records once the run's collect steps are done.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from medseg.artifact.files import MODEL_FILES, read_config
from medseg.config import DataConfig
from medseg.core.errors import DatasetError, InvalidInput, MedsegError
from medseg.core.storage import Storage, join
from medseg.data.manifest import CaseEntry, DatasetRef
from medseg.data.preprocess import (
    INDEX,
    PreprocessResult,
    build_index,
    preprocessed_prefix,
    process_cases,
)
from medseg.inference.classify import INDEX as PREDICTIONS
from medseg.inference.classify import classify_rows, write_predictions
from medseg.inference.infer import load_model
from medseg.inference.predict import (
    CaseFailure,
    CaseInput,
    CaseSource,
    PredictResult,
    dataset_source,
    segment_cases,
    split_output_uri,
    write_index,
)
from medseg.platform.pipeline_params import object_digest
from medseg.tasks import task_of

__all__ = [
    "PARTS",
    "ShardResult",
    "assign",
    "case_key",
    "check_shards",
    "clean_shard",
    "collect_predictions",
    "collect_preprocessed",
    "predict_shard",
    "preprocess_shard",
    "shard_cases",
    "shard_list",
]

#: The folder of per-case records a shard writes beside its outputs.
PARTS = "parts"


@dataclass
class ShardResult:
    """What one shard did.

    Attributes:
        shard: Its index, from 0.
        shards: How many shards there are.
        cases: Its cases (sorted).
        computed: The cases it computed in this run.
        reused: The cases it found done in the store.
        failed: The cases that could not be predicted (predict only).
    """

    shard: int
    shards: int
    cases: list[str]
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[CaseFailure] = field(default_factory=list)


def check_shards(shards: int) -> int:
    """``shards`` if it is a usable shard count.

    Raises:
        InvalidInput: If it is below 1.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise InvalidInput(f"shards must be a whole number of at least 1, got {shards!r}")
    return shards


def shard_list(shards: int) -> list[int]:
    """The shard indices ``0 … shards-1`` (what the pipeline's ``ParallelFor`` runs over)."""
    return list(range(check_shards(shards)))


def assign(case_ids: Sequence[str], shards: int) -> list[list[str]]:
    """Split case ids into ``shards`` lists: sorted round-robin (see the module docstring).

    Raises:
        InvalidInput: If ``shards`` is below 1 or an id is repeated.
    """
    check_shards(shards)
    ordered = sorted(case_ids)
    if len(set(ordered)) != len(ordered):
        repeated = sorted({c for c in ordered if ordered.count(c) > 1})
        raise InvalidInput(f"case ids repeated: {', '.join(repeated)}")
    return [ordered[i::shards] for i in range(shards)]


def shard_cases(case_ids: Sequence[str], shard: int, shards: int) -> list[str]:
    """The cases of shard ``shard`` of ``shards``.

    Raises:
        InvalidInput: If ``shard`` is not in ``0 … shards-1``.
    """
    parts = assign(case_ids, shards)
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < shards:
        raise InvalidInput(f"shard {shard!r} is not one of 0…{shards - 1}")
    return parts[shard]


def _part(prefix: str, case_id: str) -> str:
    return join(prefix, PARTS, f"{case_id}.json")


def _read_part(storage: Storage, prefix: str, case_id: str) -> dict[str, Any] | None:
    uri = _part(prefix, case_id)
    if not storage.exists(uri):
        return None
    part = storage.get_json(uri)
    if not isinstance(part, dict):
        raise MedsegError(f"{uri} is not a shard record (a JSON object)")
    return part


def _missing(what: str, missing: Sequence[str], ids: Sequence[str], shards: int) -> str:
    """A message naming, per shard, the cases without a record."""
    lost = set(missing)
    by_shard = [
        f"shard {i} of {shards}: {', '.join(c for c in part if c in lost)}"
        for i, part in enumerate(assign(ids, shards))
        if lost.intersection(part)
    ]
    return f"{what}: no shard record for {len(lost)} cases ({'; '.join(by_shard)}); rerun them"


# -- preprocess -----------------------------------------------------------------------------


def preprocess_shard(
    spec: str,
    store: str,
    cfg: DataConfig,
    shard: int,
    shards: int,
    storage: Storage | None = None,
    workers: int = 1,
    progress: bool = False,
) -> ShardResult:
    """Preprocess the cases of one shard that are not done yet (see the module docstring).

    Args:
        spec: ``NAME``, ``NAME@latest`` or ``NAME@VERSION``.
        store: Root URI of the store.
        cfg: Preprocessing config.
        shard: This shard, from 0.
        shards: How many shards.
        storage: Storage to use; from the environment when omitted.
        workers: Worker processes inside the shard.
        progress: Show a progress bar.

    Raises:
        DatasetError: If the dataset does not exist or a case fails (naming it).
    """
    storage = storage or Storage()
    ref = DatasetRef.resolve(storage, store, spec)
    manifest = ref.load(storage)
    prefix = preprocessed_prefix(ref, cfg)
    mine = shard_cases([c.case_id for c in manifest.cases], shard, shards)
    result = ShardResult(shard, shards, mine)
    if storage.exists(join(prefix, INDEX)):  # committed: every case is there
        result.reused = list(mine)
        return result
    todo = []
    for case_id in mine:
        if storage.exists(_part(prefix, case_id)):
            result.reused.append(case_id)
        else:
            todo.append(case_id)

    def record(entry: dict[str, Any]) -> None:
        storage.put_json(_part(prefix, entry["case_id"]), entry)
        result.computed.append(entry["case_id"])

    process_cases(storage, ref, manifest, cfg, todo, workers, progress, on_entry=record)
    return result


def collect_preprocessed(
    spec: str, store: str, cfg: DataConfig, shards: int, storage: Storage | None = None
) -> PreprocessResult:
    """Write ``index.json`` from the shards' records: the unsharded step's index.

    Returns:
        The prefix, the index and how many case records it gathered (0 when the index was
        already there).

    Raises:
        DatasetError: If a case has no record, naming its shard; nothing is written then.
    """
    storage = storage or Storage()
    ref = DatasetRef.resolve(storage, store, spec)
    manifest = ref.load(storage)
    prefix = preprocessed_prefix(ref, cfg)
    index_uri = join(prefix, INDEX)
    if storage.exists(index_uri):
        return PreprocessResult(prefix, storage.get_json(index_uri), processed=0)
    ids = [c.case_id for c in manifest.cases]
    entries = {c: part for c in ids if (part := _read_part(storage, prefix, c)) is not None}
    missing = [c for c in ids if c not in entries]
    if missing:
        raise DatasetError(_missing(f"preprocess {ref}", missing, ids, check_shards(shards)))
    index = build_index(store, ref, manifest, cfg, entries)
    storage.put_json(index_uri, index)
    return PreprocessResult(prefix, index, processed=len(entries))


# -- predict --------------------------------------------------------------------------------


def case_key(model: dict[str, str], case: CaseEntry, convention: str) -> str:
    """The content key of one case's prediction: the model's files, the raw files, the labels.

    Args:
        model: sha256 of the model's ``model.pt`` and ``model.yaml``, by file name.
        case: The case's manifest entry (its files' sha256).
        convention: Label convention of the written map.
    """
    body = {
        "model": dict(sorted(model.items())),
        "case": case.case_id,
        "files": {f.role: f.sha256 for f in sorted(case.files, key=lambda f: f.role)},
        "labels": convention,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class _Split:
    """A dataset split as the predict shards and the collect see it."""

    source: CaseSource
    out: str
    convention: str
    keys: dict[str, str]


def _split(
    storage: Storage,
    model_uri: str,
    dataset: str,
    split: str,
    store: str,
    out: str | None,
    labels: str | None,
) -> _Split:
    ref = DatasetRef.resolve(storage, store, dataset)
    manifest = ref.load(storage)
    source = dataset_source(storage, store, str(ref), split)
    convention = labels or source.convention
    model = {n: object_digest(storage, join(model_uri, n)) for n in MODEL_FILES}
    keys = {c.case_id: case_key(model, manifest.case(c.case_id), convention) for c in source.cases}
    return _Split(source, out or split_output_uri(model_uri, source), convention, keys)


def predict_shard(
    model_uri: str,
    dataset: str,
    split: str,
    store: str,
    shard: int,
    shards: int,
    out: str | None = None,
    storage: Storage | None = None,
    labels: str | None = None,
    prefetch: int = 2,
) -> ShardResult:
    """Predict the cases of one shard of a dataset split that are not done yet.

    The outputs are those of :func:`medseg.inference.predict.predict` (same ``out`` by default); the
    model is loaded only when a case is left to do. A case that fails is recorded as failed
    (the collect lists it) and tried again by the next run.

    Raises:
        MedsegError: If the model or the dataset is unusable.
    """
    storage = storage or Storage()
    s = _split(storage, model_uri, dataset, split, store, out, labels)
    mine = shard_cases(list(s.keys), shard, shards)
    result = ShardResult(shard, shards, mine)
    todo: list[CaseInput] = []
    for case in s.source.cases:
        if case.case_id not in mine:
            continue
        part = _read_part(storage, s.out, case.case_id)
        done = part is not None and part.get("key") == s.keys[case.case_id] and "row" in part
        if done:
            result.reused.append(case.case_id)
        else:
            todo.append(case)
    if not todo:
        return result

    def record(case: CaseInput, row: dict[str, Any] | None, failure: CaseFailure | None) -> None:
        part: dict[str, Any] = {"key": s.keys[case.case_id]}
        if row is not None:
            part["row"] = row
            result.computed.append(case.case_id)
        else:
            assert failure is not None
            part["failure"] = asdict(failure)
            result.failed.append(failure)
        storage.put_json(_part(s.out, case.case_id), part)

    seg = load_model(model_uri, storage)
    if seg.task.outputs.kind == "classes":
        rows, failures = classify_rows(seg, storage, [(c.case_id, c.files["image"]) for c in todo])
        by_case = {r["case_id"]: r for r in rows}
        for case in todo:
            if case.case_id in by_case:
                record(case, by_case[case.case_id], None)
            else:
                reason = failures[case.case_id]
                record(case, None, CaseFailure(case.case_id, case.files["image"], reason))
        return result
    source = CaseSource(s.source.name, todo, s.source.convention, s.source.dataset, split)
    segment_cases(seg, source, s.out, storage, s.convention, prefetch, on_done=record)
    return result


def collect_predictions(
    model_uri: str,
    dataset: str,
    split: str,
    store: str,
    shards: int,
    out: str | None = None,
    storage: Storage | None = None,
    labels: str | None = None,
) -> PredictResult:
    """Write the volume tables and ``predictions.json`` from the shards' records.

    What it writes is what :func:`medseg.inference.predict.predict` writes for the split: rows and
    failures in the split's order.

    Raises:
        MedsegError: If a case has no record for this model and data, naming its shard;
            nothing is written then.
    """
    started = time.perf_counter()
    storage = storage or Storage()
    s = _split(storage, model_uri, dataset, split, store, out, labels)
    rows: list[dict[str, Any]] = []
    failed: list[CaseFailure] = []
    missing = []
    for case in s.source.cases:
        part = _read_part(storage, s.out, case.case_id)
        if part is None or part.get("key") != s.keys[case.case_id]:
            missing.append(case.case_id)
        elif "row" in part:
            rows.append(part["row"])
        else:
            failed.append(CaseFailure(**part["failure"]))
    if missing:
        what = f"predict {s.source.name} with {model_uri}"
        raise MedsegError(_missing(what, missing, list(s.keys), check_shards(shards)))
    cfg = read_config(model_uri, storage)
    task = task_of(cfg)
    if task.outputs.kind == "classes":
        reasons = {f.case_id: f.reason for f in failed}
        source = (s.source.dataset or "", s.source.split or "")
        write_predictions(storage, s.out, task.outputs.names, rows, reasons, source)
    else:
        write_index(storage, s.out, s.source, cfg, model_uri, s.convention, rows, failed)
    return PredictResult(s.out, rows, failed, time.perf_counter() - started)


# -- cleanup --------------------------------------------------------------------------------


def clean_shard(
    storage: Storage,
    dataset: str,
    store: str,
    shard: int,
    shards: int,
    preprocessed: str = "",
    predictions: str = "",
    split: str = "validation",
) -> int:
    """Delete one shard's records once its collect steps have committed; returns how many.

    Args:
        storage: Storage to use.
        dataset: ``NAME@VERSION`` the shards worked on.
        store: Root of the store holding it.
        shard: The shard, from 0.
        shards: How many shards.
        preprocessed: The preprocessing prefix (its ``index.json`` must exist), or empty.
        predictions: The predictions prefix (its ``predictions.json`` must exist), or empty.
        split: The split that was predicted.

    Raises:
        MedsegError: If a commit is not there yet (the records are what it is made from).
    """
    ref = DatasetRef.resolve(storage, store, dataset)
    manifest = ref.load(storage)
    targets = []
    if preprocessed:
        targets.append((preprocessed, INDEX, [c.case_id for c in manifest.cases]))
    if predictions:
        ids = [c.case_id for c in manifest.cases if split == "all" or c.split == split]
        targets.append((predictions, PREDICTIONS, ids))
    deleted = 0
    for prefix, commit, ids in targets:
        if not storage.exists(join(prefix, commit)):
            raise MedsegError(f"{prefix} has no {commit} yet: its shard records are still needed")
        for case_id in shard_cases(ids, shard, shards):
            uri = _part(prefix, case_id)
            if storage.exists(uri):
                storage.delete(uri)
                deleted += 1
    return deleted
