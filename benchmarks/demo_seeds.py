"""The demo's validation Dice on served label maps, for several training seeds and nestings.

Not a test: it trains the demo's model (``medseg.apps.demo.DEMO_CONFIG``, the demo's 20 synthetic
cases, two torchrun processes, as ``medseg demo`` does) once per seed into a local store, then
predicts the validation split through ``segment_case`` (the server's function) with each nesting
option and scores the label maps on the original grid (``medseg.evaluation.evaluate``).

    python benchmarks/demo_seeds.py train --work .medseg/seeds --seeds 0 1 2
    python benchmarks/demo_seeds.py eval --work .medseg/seeds --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from medseg.apps.demo import DEMO_CONFIG, DEMO_SHAPE
from medseg.config import MedsegConfig
from medseg.core.storage import Storage, join
from medseg.data.ingest import ingest
from medseg.data.preprocess import preprocess
from medseg.data.synth import write_dataset
from medseg.evaluation.evaluate import evaluate
from medseg.inference.infer import load_model
from medseg.inference.predict import predict
from medseg.platform.launchers import TorchrunLauncher, TrainRun

NESTINGS = ("union", "intersect", "disjoint")


def _config(seed: int) -> MedsegConfig:
    cfg = MedsegConfig.model_validate(DEMO_CONFIG)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})


def train(work: Path, seeds: list[int], cases: int) -> None:
    store = str(work / "store")
    raw = work / "raw"
    if not raw.is_dir():
        write_dataset(raw, "brats2021", cases, shape=DEMO_SHAPE)
    cfg = _config(0)
    storage = Storage()
    spec = str(ingest(str(raw), "demo", store, storage=storage, split=cfg.split).ref)
    preprocess(spec, store, cfg.data, storage=storage, progress=False, workers=2)
    for seed in seeds:
        path = work / f"seed{seed}.yaml"
        path.write_text(_config(seed).to_yaml())
        started = time.perf_counter()
        TorchrunLauncher(nproc=2).launch(TrainRun(spec, store, f"seed{seed}", str(path)))
        print(f"seed {seed}: trained in {time.perf_counter() - started:.0f} s", flush=True)


def evaluate_seeds(work: Path, seeds: list[int], nestings: list[str]) -> None:
    store = str(work / "store")
    storage = Storage()
    print("seed  nesting    TC      WT      ET      mean    (channel metric: mean)")
    for seed in seeds:
        model_uri = join(store, "runs", f"seed{seed}", "model")
        channel = storage.get_json(join(model_uri, "lineage.json"))["best"]["dice_mean"]
        seg = load_model(model_uri, storage)
        for nesting in nestings:
            infer = seg.cfg.infer.model_copy(update={"nesting": nesting})
            seg.cfg = seg.cfg.model_copy(update={"infer": infer})
            out = join(store, "runs", f"seed{seed}", f"predictions-{nesting}")
            ds = storage.get_json(join(model_uri, "lineage.json"))["dataset"]
            spec = f"{ds['name']}@{ds['version']}"
            pred = predict(
                model_uri, out, dataset=spec, store=store, storage=storage, segmenter=seg
            )
            result = evaluate(
                model_uri,
                storage=storage,
                segmenter=seg,
                predictions=pred.out,
                out=join(store, "runs", f"seed{seed}", f"eval-{nesting}"),
                max_overlays=0,
            )
            d = result.dice
            print(
                f"{seed:<5} {nesting:<10} {d['TC']:.4f}  {d['WT']:.4f}  {d['ET']:.4f}  "
                f"{result.dice_mean:.4f}  ({channel:.4f})",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["train", "eval"])
    parser.add_argument("--work", type=Path, default=Path(".medseg/seeds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--nesting", nargs="+", default=list(NESTINGS))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "train":
        train(args.work, args.seeds, args.cases)
    else:
        evaluate_seeds(args.work, args.seeds, args.nesting)


if __name__ == "__main__":
    main()
