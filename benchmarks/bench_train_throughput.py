"""Training throughput (samples/s): medseg's loop against a MONAI tutorial loop; 1 vs 2 procs.

All on the same synthetic BraTS-like data, model, ROI and batch size, in one run:

* tutorial: MONAI's BraTS tutorial pattern — ``CacheDataset`` over the raw NIfTI files with the
  static chain cached in memory and the random chain per item, a plain DataLoader, SegResNet,
  DiceLoss, Adam; one process;
* medseg, 1 process: :func:`medseg.training.train.train` (preprocessed cases from MinIO through the
  local cache, random chain in the loader, checkpoint to MinIO every epoch);
* medseg, 2 processes: ``medseg train --nproc-per-node 2`` (torchrun, gloo, DDP).

Samples/s are over the timed epochs after a warm-up epoch, validation excluded. Prints the ratios
medseg / tutorial (target ≥ 1) and 2 procs / 1 proc.

Usage: ``python benchmarks/bench_train_throughput.py [--cases 12] [--shape 96 96 64] [--epochs 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from medseg.apps.minio_server import MinioServer
from medseg.config import MedsegConfig
from medseg.core.storage import Storage
from medseg.data.ingest import ingest
from medseg.data.manifest import DatasetRef
from medseg.data.preprocess import preprocess
from medseg.data.synth import write_dataset
from medseg.data.transforms import static_transforms, train_transforms
from medseg.tasks.networks import build_network
from medseg.training.train import train

MODALITIES = ("t1", "t1ce", "t2", "flair")


def tutorial_files(raw: Path, case_ids: set[str] | None = None) -> list[dict[str, Any]]:
    """The tutorial's ``{"image": [4 files], "label": file}`` items of the cases under ``raw``.

    Args:
        raw: A folder of synthetic case folders (:func:`medseg.data.synth.write_dataset`).
        case_ids: Only these case folders (a split); every case when omitted.
    """
    files = []
    for case in sorted(p for p in raw.iterdir() if p.is_dir()):
        if case_ids is None or case.name in case_ids:
            files.append(
                {
                    "image": [str(next(case.glob(f"*_{m}.nii.gz"))) for m in MODALITIES],
                    "label": str(next(case.glob("*_seg.nii.gz"))),
                }
            )
    return files


class TutorialLoop:
    """The MONAI tutorial's training loop, one epoch per :meth:`epoch` call.

    ``CacheDataset`` with the static chain cached and the random chain per item, a plain
    DataLoader, SegResNet (seeded as medseg seeds it), DiceLoss and Adam with a constant rate.

    Attributes:
        net: The network being trained.
        cache_seconds: Time to build the ``CacheDataset``.
    """

    def __init__(self, files: list[dict[str, Any]], cfg: MedsegConfig):
        from monai.data import CacheDataset, DataLoader
        from monai.losses import DiceLoss
        from monai.transforms import Compose

        chain = Compose(
            [
                *static_transforms(cfg.data, "brats2021").transforms,
                *train_transforms(cfg.train, seed=cfg.train.seed).transforms,
            ]
        )
        t = time.perf_counter()
        data = CacheDataset(files, transform=chain, cache_rate=1.0, num_workers=0, progress=False)
        self.cache_seconds = time.perf_counter() - t
        self.loader = DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True)
        torch.manual_seed(cfg.train.seed)
        self.net = build_network(cfg.model)
        self.loss_fn = DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, sigmoid=True)
        t_cfg = cfg.train
        self.opt = torch.optim.Adam(
            self.net.parameters(), lr=t_cfg.lr, weight_decay=t_cfg.weight_decay
        )

    def epoch(self) -> tuple[int, float]:
        """One pass over the data: (samples, seconds)."""
        self.net.train()
        t = time.perf_counter()
        n = 0
        for batch in self.loader:
            self.opt.zero_grad()
            loss = self.loss_fn(self.net(batch["image"]), batch["label"])
            loss.backward()
            self.opt.step()
            n += len(batch["image"])
        return n, time.perf_counter() - t


def tutorial_loop(raw: Path, cfg: MedsegConfig, epochs: int) -> tuple[float, float]:
    """(cache build seconds, samples/s) of the MONAI tutorial-style loop."""
    loop = TutorialLoop(tutorial_files(raw), cfg)
    loop.epoch()  # warm-up
    samples, seconds = 0, 0.0
    for _ in range(epochs):
        n, s = loop.epoch()
        samples, seconds = samples + n, seconds + s
    return loop.cache_seconds, samples / seconds


def _rate(history: list[dict]) -> float:
    timed = [h for h in history[1:] if h.get("dice_mean") is None]  # warm-up and validation out
    return sum(h["samples"] for h in timed) / sum(h["epoch_seconds"] for h in timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64))
    parser.add_argument("--epochs", type=int, default=3, help="Timed epochs (plus one warm-up).")
    parser.add_argument("--roi", type=int, nargs=3, default=(64, 64, 48))
    parser.add_argument("--init-filters", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2, help="Per process.")
    args = parser.parse_args()
    epochs = args.epochs + 2  # + warm-up + the last (validated) epoch
    cfg = MedsegConfig.model_validate(
        {
            "split": {"val_fraction": 0.15},
            "train": {
                "epochs": epochs,
                "batch_size": args.batch,
                "num_workers": 0,
                "val_every": 1000,
                "lr": 1e-3,
                "roi_size": list(args.roi),
            },
            "model": {"init_filters": args.init_filters},
            "infer": {"roi_size": list(args.roi)},
        }
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        raw = tmp / "raw"
        write_dataset(raw, "brats2021", args.cases, shape=tuple(args.shape), seed=5)
        server = MinioServer(tmp / "minio").start()
        try:
            env = {
                **os.environ,
                **server.env(),
                "MEDSEG_CACHE_DIR": str(tmp / "cache"),
                "MEDSEG_ENV_FILE": str(tmp / "none.env"),
            }
            os.environ.update(env)
            storage = Storage(server.settings())
            storage.ensure_bucket("s3://bench")
            ingest(str(raw), "b", "s3://bench", storage=storage, split=cfg.split)
            preprocess("b", "s3://bench", cfg.data, storage=storage, progress=False)
            n_train = len(
                DatasetRef.resolve(storage, "s3://bench", "b").load(storage).split_ids("train")
            )
            print(
                f"{args.cases} cases {list(args.shape)}, ROI {cfg.train.roi_size}, "
                f"batch {args.batch}, "
                f"{args.epochs} timed epochs; torch threads {torch.get_num_threads()}"
            )
            cache_s, tutorial = tutorial_loop(raw, cfg, args.epochs)
            one = _rate(train("b", "s3://bench", "one", cfg, storage=storage).history)
            (tmp / "cfg.yaml").write_text(cfg.to_yaml())
            cmd = [
                sys.executable,
                "-m",
                "medseg",
                "train",
                "-d",
                "b",
                "--run-id",
                "two",
                "--store",
                "s3://bench",
                "-c",
                str(tmp / "cfg.yaml"),
                "--nproc-per-node",
                "2",
            ]
            subprocess.run(
                cmd, env={**env, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True
            )
            lines = storage.get_bytes("s3://bench/runs/two/metrics.jsonl").decode().splitlines()
            two = _rate([json.loads(line) for line in lines])
        finally:
            server.stop()
    print(f"  dataset cases: {n_train} (train split used by medseg; the tutorial uses all)")
    print(f"  tutorial CacheDataset build: {cache_s:.1f} s")
    print(f"  tutorial loop, 1 process:  {tutorial:6.2f} samples/s")
    print(f"  medseg, 1 process:         {one:6.2f} samples/s   ({one / tutorial:.2f}x tutorial)")
    print(f"  medseg, 2 processes (DDP): {two:6.2f} samples/s   ({two / one:.2f}x 1 process)")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
