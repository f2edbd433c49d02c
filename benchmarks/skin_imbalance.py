"""Class-weighted loss against a weighted sampler (and neither), through the platform's chain.

Writes ``--images`` synthetic HAM10000 images (:mod:`medseg.data.skin_synth`, HAM10000's class
frequencies), ingests them into a local store (split by lesion), preprocesses them to
``--size`` px, and trains the skin-lesion task (DenseNet121) with the shared trainer once per
``task.imbalance`` setting, with the same seed and epochs. Prints, per setting, the best
validation macro ROC AUC (the gate, which picks the kept weights) and the balanced accuracy of
that epoch, on the held-out lesions. CPU is enough at small sizes.

    python benchmarks/skin_imbalance.py --images 210 --size 48 --epochs 6
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from medseg.config import MedsegConfig, SplitConfig
from medseg.core.storage import Storage
from medseg.data.ingest import ingest
from medseg.data.preprocess import preprocess
from medseg.data.skin_synth import write_ham10000
from medseg.tasks.skin_classes import CHANNELS, CLASSES
from medseg.training.train import train

SETTINGS = ("none", "class_weighted", "weighted_sampler")


def config(imbalance: str, size: int, epochs: int, seed: int) -> MedsegConfig:
    return MedsegConfig.model_validate(
        {
            "task": {"kind": "skin-lesion-classification", "imbalance": imbalance},
            "data": {"channels": list(CHANNELS), "image_size": [size, size]},
            "model": {"name": "DenseNet121", "in_channels": 3, "out_channels": len(CLASSES)},
            "train": {
                "epochs": epochs,
                "batch_size": 16,
                "lr": 1e-3,
                "num_workers": 0,
                "amp": False,
                "seed": seed,
            },
            "split": {"val_fraction": 0.3, "seed": seed},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=210)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medseg-imbalance-") as tmp:
        root, store = Path(tmp) / "ham", str(Path(tmp) / "store")
        write_ham10000(root, args.images, seed=args.seed)
        storage = Storage()
        split = SplitConfig(val_fraction=0.3, seed=args.seed)
        ref = ingest(str(root), "skin", store, storage=storage, split=split).ref
        for imbalance in args.settings:
            cfg = config(imbalance, args.size, args.epochs, args.seed)
            preprocess(str(ref), store, cfg.data, storage=storage, progress=False)
            started = time.perf_counter()
            run = train(str(ref), store, f"imb-{imbalance.replace('_', '-')}", cfg, storage=storage)
            best = run.best
            print(
                json.dumps(
                    {
                        "imbalance": imbalance,
                        "best_epoch": best["epoch"],
                        "macro_auc": round(best["macro_auc"], 4),
                        "balanced_accuracy": round(best["balanced_accuracy"], 4),
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
