"""Are the synthetic skin-lesion classes learnable, and not trivially? A small CNN answers.

Renders ``--images`` synthetic dermoscopy images (:mod:`medseg.data.skin_synth`), splits them by
lesion with the ingest's seeded split (:func:`medseg.data.ingest._assign_split`, groups = lesions),
trains a four-layer CNN (class-weighted cross-entropy, Adam, random flips) on the training
lesions at a quarter of the resolution, and prints its macro ROC AUC and balanced accuracy on
the held-out lesions (:mod:`medseg.tasks.skin_metrics`), for each ``--seeds`` value. CPU is enough.

    python benchmarks/skin_learnability.py --images 420 --epochs 30 --seeds 0 1
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch import nn

from medseg.config import SplitConfig
from medseg.data.ingest import _assign_split
from medseg.data.skin_synth import SynthImage, make_image, plan_lesions
from medseg.tasks.skin_classes import CLASSES
from medseg.tasks.skin_metrics import classification_metrics


def _render(args: tuple[SynthImage, int]) -> np.ndarray:
    planned, seed = args
    img = make_image(planned, seed).astype(np.float32) / 255
    small = img[:448].reshape(112, 4, 150, 4, 3).mean(axis=(1, 3))  # 450×600 → 112×150
    return small.transpose(2, 0, 1)


def _net() -> nn.Module:
    layers: list[nn.Module] = []
    width = 3
    for out in (16, 32, 64, 64):
        layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        width = out
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, len(CLASSES))
    )


def run(n_images: int, epochs: int, seed: int, workers: int) -> dict[str, float]:
    images = plan_lesions(n_images, seed)
    with ProcessPoolExecutor(workers) as pool:
        x = torch.from_numpy(np.stack(list(pool.map(_render, [(i, seed) for i in images]))))
    y = torch.tensor([CLASSES.index(i.dx) for i in images])
    groups = {i.image_id: i.lesion_id for i in images}
    side = _assign_split(list(groups), SplitConfig(val_fraction=0.3, seed=seed), groups)
    val = torch.tensor([side[i.image_id] == "validation" for i in images])
    torch.manual_seed(seed)
    net = _net()
    counts = torch.bincount(y[~val], minlength=len(CLASSES)).float()
    loss_fn = nn.CrossEntropyLoss(weight=counts.sum() / (len(CLASSES) * counts.clamp(min=1)))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    train_x, train_y = x[~val], y[~val]
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(train_x)).split(32):
            batch = train_x[idx]
            if torch.rand(()) < 0.5:
                batch = batch.flip(-1)
            if torch.rand(()) < 0.5:
                batch = batch.flip(-2)
            opt.zero_grad()
            loss_fn(net(batch), train_y[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        probs = torch.softmax(net(x[val]), dim=1)
    m = classification_metrics(probs, y[val], CLASSES)
    return {
        "macro_auc": m.macro_auc,
        "balanced_accuracy": m.balanced_accuracy,
        "val_images": int(val.sum()),
        "val_lesions": len({groups[i.image_id] for i, v in zip(images, val, strict=True) if v}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=420)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.workers)
    for seed in args.seeds:
        start = time.perf_counter()
        r = run(args.images, args.epochs, seed, args.workers)
        print(
            f"seed {seed}: macro AUC {r['macro_auc']:.3f}, balanced accuracy "
            f"{r['balanced_accuracy']:.3f} on {r['val_images']} held-out images of "
            f"{r['val_lesions']} lesions (chance: 0.5 and {1 / len(CLASSES):.3f}); "
            f"{time.perf_counter() - start:.0f} s"
        )


if __name__ == "__main__":
    main()
