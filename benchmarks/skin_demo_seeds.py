"""The skin-lesion demo's held-out scores (macro ROC AUC, balanced accuracy), for several seeds.

Not a test: it trains the skin demo's model (``medseg.apps.demo.SKIN_DEMO_CONFIG`` on the demo's
280 synthetic HAM10000-like images, two torchrun processes as ``medseg demo --task
skin-lesion`` runs it) once per training seed into a local store, predicts the held-out lesions'
images through batch prediction (the server's function,
:func:`medseg.inference.classify.classify_images`) and scores what was written
(:func:`medseg.evaluation.evaluate.evaluate`).

    python benchmarks/skin_demo_seeds.py --work .medseg/skin-seeds --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from medseg.apps.demo import DEMOS
from medseg.config import MedsegConfig
from medseg.core.storage import Storage, join
from medseg.data.ingest import ingest
from medseg.data.preprocess import preprocess
from medseg.data.skin_synth import write_ham10000
from medseg.evaluation.evaluate import evaluate
from medseg.inference.predict import predict
from medseg.platform.launchers import TorchrunLauncher, TrainRun

DEMO = DEMOS["skin-lesion"]


def _config(seed: int) -> MedsegConfig:
    cfg = MedsegConfig.model_validate(DEMO.config)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})


def run(work: Path, seeds: list[int], images: int) -> None:
    store = str(work / "store")
    raw = work / "raw"
    if not raw.is_dir():
        write_ham10000(raw, images, seed=0)  # the demo's data
    cfg = _config(0)
    storage = Storage()
    spec = str(ingest(str(raw), "skin-demo", store, storage=storage, split=cfg.split).ref)
    preprocess(spec, store, cfg.data, storage=storage, progress=False, workers=2)
    print("seed  macro AUC  balanced acc.  accuracy  best epoch  train s", flush=True)
    for seed in seeds:
        path = work / f"seed{seed}.yaml"
        path.write_text(_config(seed).to_yaml())
        started = time.perf_counter()
        TorchrunLauncher(nproc=2).launch(TrainRun(spec, store, f"seed{seed}", str(path)))
        seconds = time.perf_counter() - started
        model_uri = join(store, "runs", f"seed{seed}", "model")
        best = storage.get_json(join(model_uri, "lineage.json"))["best"]
        pred = predict(model_uri, dataset=spec, store=store, storage=storage)
        result = evaluate(model_uri, storage=storage, predictions=pred.out)
        s = result.summary()
        print(
            f"{seed:<5} {s['macro_auc']:.4f}     {s['balanced_accuracy']:.4f}         "
            f"{s['accuracy']:.4f}    {best.get('epoch')!s:<10}  {seconds:.0f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(".medseg/skin-seeds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=DEMO.cases)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    run(args.work, args.seeds, args.images)


if __name__ == "__main__":
    main()
