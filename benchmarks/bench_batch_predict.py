"""Batch prediction against one ``medseg predict`` process per case; evaluation time per case.

Both sides run the real command line (``python -m medseg predict``) on the same synthetic cases
(the demo's shape and model config; the weights do not change the speed) with a local model
folder and store: the baseline starts one process per case, the batch one process for the whole
folder (one model load, reading and decoding overlapped with compute). Then the cases are
ingested and evaluated from the batch's label maps: scoring time per case, and the whole
``evaluate`` call per case.

    python benchmarks/bench_batch_predict.py --cases 8
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medseg.apps.demo import DEMO_CONFIG, DEMO_SHAPE
from medseg.apps.model_server_process import write_seeded_model
from medseg.config import MedsegConfig
from medseg.core.storage import Storage
from medseg.data.ingest import ingest
from medseg.data.synth import write_dataset
from medseg.evaluation.evaluate import evaluate
from medseg.inference.predict import predict


def _cli(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "medseg", "predict", *args],
        check=True,
        capture_output=True,
        env={**os.environ, "MEDSEG_ENV_FILE": os.devnull},
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEMO_SHAPE))
    args = parser.parse_args()
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        root = Path(tmp)
        write_dataset(root / "raw", "brats2021", args.cases, shape=shape)  # type: ignore[arg-type]
        cfg = MedsegConfig.model_validate(DEMO_CONFIG)
        model = write_seeded_model(root / "model", cfg)
        cases = sorted(p for p in (root / "raw").iterdir() if p.is_dir())
        print(
            f"{len(cases)} cases of shape {shape}, {cfg.model.name} "
            f"({cfg.model.init_filters} initial filters)"
        )

        per_case = [
            _cli(str(c), "--model", str(model), "--out", str(root / "one" / c.name)) for c in cases
        ]
        baseline = sum(per_case)
        print(f"one process per case: {baseline:.1f} s ({baseline / len(cases):.2f} s per case)")
        batch = _cli(str(root / "raw"), "--model", str(model), "--out", str(root / "batch"))
        print(f"one batch process:    {batch:.1f} s ({batch / len(cases):.2f} s per case)")
        print(f"speed-up: {baseline / batch:.2f}x (target >= 1.3x)")

        storage = Storage()
        store = str(root / "store")
        spec = str(ingest(str(root / "raw"), "bench", store, storage=storage).ref)
        pred = predict(str(model), str(root / "pred"), dataset=spec, split="all", store=store,
                       storage=storage)  # fmt: skip
        started = time.perf_counter()
        result = evaluate(str(model), dataset=spec, store=store, split="all", storage=storage,
                          predictions=pred.out, out=str(root / "eval"), max_overlays=0)  # fmt: skip
        total = time.perf_counter() - started
        print(
            f"evaluation: {result.seconds_per_case:.3f} s per case scoring (read + Dice + HD95), "
            f"{total / len(cases):.3f} s per case for the whole evaluate call (report included)"
        )


if __name__ == "__main__":
    main()
