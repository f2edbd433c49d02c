"""Static preprocessing, done once per case and cached in the object store.

The chain of :func:`medseg.data.transforms.static_transforms` runs on every case of a dataset
version in worker processes, and each case becomes one object: an uncompressed ``.npz`` with
``image`` (float16 ``[4, X, Y, Z]``), ``label`` (uint8 ``[3, X, Y, Z]``: TC, WT, ET) and ``affine``.
The objects live under a prefix keyed by the fingerprint of the preprocessing config::

    STORE/datasets/NAME/VERSION/preprocessed/FINGERPRINT/cases/CASE.npz
    STORE/datasets/NAME/VERSION/preprocessed/FINGERPRINT/index.json   (written last: the commit)

A second run with the same config finds ``index.json`` and does nothing; a run interrupted
part-way keeps the cases already stored and processes only the rest.
"""

from __future__ import annotations

import io
import multiprocessing
import tempfile
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from medseg.config import DataConfig
from medseg.core.errors import DatasetError, MedsegError
from medseg.core.settings import StorageSettings
from medseg.core.storage import Storage, join
from medseg.data.manifest import CaseEntry, DatasetRef, Manifest
from medseg.data.transforms import static_transforms
from medseg.tasks import Task, task_of_convention

__all__ = [
    "INDEX",
    "PreprocessResult",
    "build_index",
    "preprocess",
    "preprocess_case",
    "preprocessed_prefix",
    "process_cases",
]

#: The index of a preprocessing, written last (its commit).
INDEX = "index.json"

# Workers start fresh (no forked torch/OpenMP state from the parent).
_SPAWN = multiprocessing.get_context("spawn")


@dataclass
class PreprocessResult:
    """What a preprocess run did.

    Attributes:
        prefix: Where the preprocessed cases and ``index.json`` are.
        index: The index document.
        processed: Cases processed in this run (0 when the cache was complete).
    """

    prefix: str
    index: dict[str, Any]
    processed: int


def preprocessed_prefix(ref: DatasetRef, cfg: DataConfig) -> str:
    """The cache prefix of ``ref`` under the preprocessing config ``cfg``."""
    return join(ref.prefix, "preprocessed", cfg.fingerprint())


def preprocess_case(
    manifest: Manifest, case: CaseEntry, cfg: DataConfig, fetch: Any, workdir: Path
) -> dict[str, np.ndarray]:
    """Run the static chain on one stored case.

    Args:
        manifest: The dataset manifest (gives the label convention).
        case: The case entry.
        cfg: Preprocessing config.
        fetch: ``fetch(key, dest_path)`` copies a stored file to a local path.
        workdir: Scratch folder for the raw files.

    Returns:
        ``image`` float16, ``label`` uint8 and ``affine`` float64 arrays.
    """
    local: dict[str, str] = {}
    for f in case.files:
        dest = workdir / case.case_id / f.role / Path(f.key).name  # MSD: same name twice
        fetch(f.key, dest)
        local[f.role] = str(dest)
    task = task_of_convention(manifest.convention)
    own_chain = task.static_transforms(cfg)
    if own_chain is not None:
        return _classified_case(task, own_chain, case, local["image"])
    if "image" in local:
        item: dict[str, Any] = {"image": local["image"], "label": local["label"]}
        chain = static_transforms(cfg, manifest.convention, case.channel_index)
    else:
        item = {"image": [local[c] for c in cfg.channels], "label": local["label"]}
        chain = static_transforms(cfg, manifest.convention)
    out = chain(item)
    image, label = out["image"], out["label"]
    return {
        "image": image.numpy().astype(np.float16),
        "label": label.numpy().astype(np.uint8),
        "affine": np.asarray(image.affine, dtype=np.float64),
    }


def _classified_case(
    task: Task, chain: Callable[[dict[str, Any]], Any], case: CaseEntry, path: str
) -> dict[str, np.ndarray]:
    """A 2D image of a classification task through the task's own chain; its class index.

    Raises:
        DatasetError: If the case has no class, or one the task does not know.
    """
    if case.label not in task.outputs.names:
        raise DatasetError(
            f"case {case.case_id}: class {case.label!r} is not one of task {task.name}'s "
            f"{', '.join(task.outputs.names)}"
        )
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    image = chain({"image": np.ascontiguousarray(pixels)})["image"]
    return {
        "image": np.asarray(image, dtype=np.float16),
        "label": np.array([task.outputs.names.index(case.label)], dtype=np.uint8),
        "affine": np.eye(4, dtype=np.float64),
    }


def _init_worker() -> None:
    """One torch thread per worker process: the workers already use every core."""
    import torch

    torch.set_num_threads(1)


def _run_case(
    settings: StorageSettings, ref: DatasetRef, manifest: Manifest, case_id: str, cfg: DataConfig
) -> dict[str, Any]:
    """Preprocess one case and store it; returns its index entry."""
    storage = Storage(settings)
    case = manifest.case(case_id)
    recorded = {f.key: f.sha256 for f in case.files}  # every raw file verified against these
    with tempfile.TemporaryDirectory(prefix="medseg-pre-") as tmp:
        try:
            arrays = preprocess_case(
                manifest,
                case,
                cfg,
                lambda key, dest: storage.get_file(
                    join(ref.prefix, key), dest, sha256=recorded[key]
                ),
                Path(tmp),
            )
        except MedsegError:
            raise
        except Exception as exc:
            raise DatasetError(
                f"preprocess {ref} case {case_id}: {type(exc).__name__}: {exc}"
            ) from exc
    buf = io.BytesIO()
    np.savez(buf, image=arrays["image"], label=arrays["label"], affine=arrays["affine"])
    key = f"cases/{case_id}.npz"
    info = storage.put_bytes(join(preprocessed_prefix(ref, cfg), key), buf.getvalue())
    return {
        "case_id": case_id,
        "split": case.split,
        "key": key,
        "sha256": info.sha256,
        "size": info.size,
        "shape": list(arrays["image"].shape[1:]),
        **_class_of(case),
    }


def _class_of(case: CaseEntry) -> dict[str, str]:
    """``{"label": class}`` of a classified case for its index entry; nothing otherwise.

    The trainer's sampler and loss weights read the classes from the index.
    """
    return {} if case.label is None else {"label": case.label}


def process_cases(
    storage: Storage,
    ref: DatasetRef,
    manifest: Manifest,
    cfg: DataConfig,
    case_ids: list[str],
    workers: int = 1,
    progress: bool = True,
    on_entry: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Preprocess and store the cases ``case_ids`` of a dataset version, in parallel workers.

    Args:
        storage: Storage to use.
        ref: The dataset version.
        manifest: Its manifest.
        cfg: Preprocessing config.
        case_ids: The cases to process.
        workers: Worker processes (1 runs in this process).
        progress: Show a progress bar.
        on_entry: Called with each case's index entry once its object is stored.

    Returns:
        The index entry of each case processed, by case id.

    Raises:
        DatasetError: If a case fails (naming it).
    """
    done: dict[str, dict[str, Any]] = {}

    def record(entry: dict[str, Any]) -> None:
        done[entry["case_id"]] = entry
        if on_entry is not None:
            on_entry(entry)

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(f"preprocess {ref}", total=len(case_ids))
        workers = min(workers, len(case_ids))  # a spawned worker costs seconds of imports
        if workers <= 1:
            for case_id in case_ids:
                record(_run_case(storage.settings, ref, manifest, case_id, cfg))
                bar.advance(task)
        else:
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=_SPAWN, initializer=_init_worker
            ) as pool:
                futures = {
                    pool.submit(_run_case, storage.settings, ref, manifest, c, cfg)
                    for c in case_ids
                }
                pending = futures
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in finished:
                        record(fut.result())  # re-raises the first failure, naming its case
                        bar.advance(task)
    return done


def build_index(
    store: str,
    ref: DatasetRef,
    manifest: Manifest,
    cfg: DataConfig,
    entries: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The ``index.json`` document of a dataset version's preprocessing: one entry per case.

    Raises:
        DatasetError: If a case of the manifest has no entry in ``entries``.
    """
    missing = [c.case_id for c in manifest.cases if c.case_id not in entries]
    if missing:
        raise DatasetError(f"preprocess {ref}: no stored case for {', '.join(missing)}")
    return {
        "dataset": {"store": store, "name": ref.name, "version": ref.version},
        "convention": manifest.convention,
        "fingerprint": cfg.fingerprint(),
        "config": cfg.model_dump(mode="json"),
        "cases": [entries[c.case_id] for c in manifest.cases],
        "created_at": datetime.now(UTC).isoformat(),
    }


def preprocess(
    spec: str,
    store: str,
    cfg: DataConfig | None = None,
    storage: Storage | None = None,
    workers: int = 1,
    progress: bool = True,
) -> PreprocessResult:
    """Preprocess every case of a dataset version once, in parallel workers.

    Args:
        spec: ``NAME``, ``NAME@latest`` or ``NAME@VERSION``.
        store: Root URI of the store.
        cfg: Preprocessing config.
        storage: Storage to use; from the environment when omitted.
        workers: Worker processes (1 runs in this process).
        progress: Show a progress bar.

    Returns:
        The cache prefix, its index and how many cases this run processed.

    Raises:
        DatasetError: If the dataset version does not exist or a case fails.
    """
    cfg = cfg or DataConfig()
    storage = storage or Storage()
    ref = DatasetRef.resolve(storage, store, spec)
    manifest = ref.load(storage)
    prefix = preprocessed_prefix(ref, cfg)
    index_uri = join(prefix, INDEX)
    if storage.exists(index_uri):
        return PreprocessResult(prefix, storage.get_json(index_uri), processed=0)

    done: dict[str, dict[str, Any]] = {}
    todo = []
    for case in manifest.cases:
        uri = join(prefix, "cases", f"{case.case_id}.npz")
        info = storage.stat(uri) if storage.exists(uri) else None
        if info is not None and info.sha256:
            done[case.case_id] = {
                "case_id": case.case_id,
                "split": case.split,
                "key": f"cases/{case.case_id}.npz",
                "sha256": info.sha256,
                "size": info.size,
                "shape": None,
                **_class_of(case),
            }
        else:
            todo.append(case.case_id)

    done.update(
        process_cases(storage, ref, manifest, cfg, todo, workers=workers, progress=progress)
    )
    index = build_index(store, ref, manifest, cfg, done)
    storage.put_json(index_uri, index)
    return PreprocessResult(prefix, index, processed=len(todo))
