"""Per-case load time: cached preprocessed object vs decoding raw NIfTI + the static chain.

At full BraTS size (240x240x155, four modalities), in one run:

* baseline: MONAI ``LoadImaged`` on the raw ``.nii.gz`` set plus the same static chain
  (orientation, spacing, labels to TC/WT/ET, foreground crop, normalisation), as a loader
  without a cache would do every epoch;
* cached, warm: :class:`medseg.data.dataset.PreprocessedDataset` reading the local disk cache;
* cached, cold: the same, fetching the object from a real MinIO on loopback first.

Prints the medians and the ratio baseline / cached (target: >= 20x).

Usage: ``python benchmarks/bench_preprocess_cache.py [--cases 3] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from medseg.apps.minio_server import MinioServer
from medseg.config import DataConfig
from medseg.core.storage import Storage
from medseg.data.dataset import PreprocessedDataset
from medseg.data.ingest import ingest
from medseg.data.preprocess import preprocess
from medseg.data.synth import write_dataset
from medseg.data.transforms import static_transforms

SUFFIXES = {"t1": "t1", "t1gd": "t1ce", "t2": "t2", "flair": "flair"}


def _timed(fn: Callable[[Any], Any], items: Iterable[Any], repeats: int) -> list[float]:
    """Seconds per call of ``fn`` on each item, ``repeats`` times over."""
    items = list(items)
    times = []
    for _ in range(repeats):
        for item in items:
            t = time.perf_counter()
            fn(item)
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader worker's view: a DataLoader worker uses one thread

    tmp = Path(tempfile.mkdtemp(prefix="medseg-bench-"))
    try:
        raw = tmp / "raw"
        t0 = time.perf_counter()
        ids = write_dataset(raw, "brats2021", args.cases, tuple(args.shape), seed=0)
        print(
            f"generated {len(ids)} cases of {tuple(args.shape)} in {time.perf_counter() - t0:.1f}s"
        )
        cfg = DataConfig()
        chain = static_transforms(cfg, "brats2021")

        def raw_case(cid: str) -> dict[str, Any]:
            return {
                "image": [str(raw / cid / f"{cid}_{SUFFIXES[c]}.nii.gz") for c in cfg.channels],
                "label": str(raw / cid / f"{cid}_seg.nii.gz"),
            }

        baseline = _timed(lambda cid: chain(raw_case(cid)), ids, args.repeats)

        with MinioServer(tmp / "minio") as server:
            storage = Storage(server.settings())
            storage.ensure_bucket("s3://bench")
            ingest(str(raw), "bench", "s3://bench", storage=storage)
            result = preprocess("bench", "s3://bench", cfg, storage=storage, progress=False)
            ds = PreprocessedDataset(
                result.prefix, None, cache_dir=tmp / "cache", settings=storage.settings
            )
            cold = _timed(ds.__getitem__, range(len(ds)), repeats=1)
            warm = _timed(ds.__getitem__, range(len(ds)), args.repeats)
            warm_cast = _timed(lambda i: ds[i]["image"].float(), range(len(ds)), args.repeats)
            size = sum(c["size"] for c in result.index["cases"]) / len(ds) / 2**20

        b, w, c, wc = (statistics.median(x) for x in (baseline, warm, cold, warm_cast))
        print(f"raw .nii.gz + LoadImaged + static chain : {b * 1000:8.1f} ms/case (median)")
        print(f"cached object, cold (MinIO -> cache)    : {c * 1000:8.1f} ms/case ({size:.0f} MiB)")
        print(f"cached object, warm (local disk cache)  : {w * 1000:8.1f} ms/case (median)")
        print(f"  ... plus a float32 cast of the whole case: {wc * 1000:8.1f} ms/case (median)")
        print(
            f"speed-up warm: {b / w:.1f}x   warm+cast: {b / wc:.1f}x   cold: {b / c:.1f}x"
            "   (target >= 20x, warm)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
