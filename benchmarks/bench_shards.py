"""Preprocess and batch predict as 1 shard against 2 shards, each shard a process (a pod).

The same synthetic cases (the demo's shape and model config; the weights do not change the
speed) are ingested into two buckets of one real MinIO on 127.0.0.1. For each shard count K,
K processes run ``medseg.platform.shards.preprocess_shard`` at once (one thread each, as pods of one
core would), then the collect step writes ``index.json``; the same for ``predict_shard`` and
``collect_predictions`` over the whole dataset. Wall time includes each process's start (its
imports), as a pod's would. The machine's load average is printed with the figures: on a
shared machine the ratio is what the spare cores allowed.

    python benchmarks/bench_shards.py --cases 12
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

from medseg.apps.demo import DEMO_CONFIG, DEMO_SHAPE
from medseg.apps.minio_server import MinioServer
from medseg.apps.model_server_process import write_seeded_model
from medseg.config import MedsegConfig
from medseg.core.storage import Storage, join
from medseg.data.ingest import ingest
from medseg.data.synth import write_dataset
from medseg.platform.shards import collect_predictions, collect_preprocessed, shard_list

#: One shard in a process of its own: ``python -c SHARD KIND JSON``.
SHARD = """
import json, sys
from medseg.config import MedsegConfig
from medseg.platform.shards import predict_shard, preprocess_shard
kind, a = sys.argv[1], json.loads(sys.argv[2])
if kind == "start":  # only the imports a shard process pays before its first case
    import medseg.data.transforms, medseg.inference.infer  # noqa: F401
elif kind == "preprocess":
    cfg = MedsegConfig.model_validate(a["cfg"])
    preprocess_shard(a["dataset"], a["store"], cfg.data, a["shard"], a["shards"])
else:
    predict_shard(
        a["model"], a["dataset"], "all", a["store"], a["shard"], a["shards"], out=a["out"]
    )
"""


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _fan_out(kind: str, shards: int, env: dict[str, str], **args: object) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SHARD, kind, json.dumps({**args, "shard": i, "shards": shards})],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in shard_list(shards)
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a {kind} shard failed:\n{err.decode()[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEMO_SHAPE))
    args = parser.parse_args()
    cfg = MedsegConfig.model_validate(DEMO_CONFIG)
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        root = Path(tmp)
        write_dataset(root / "raw", "brats2021", args.cases, shape=tuple(args.shape))
        model = write_seeded_model(root / "model", cfg)
        with MinioServer(root / "minio") as minio:
            storage = Storage(minio.settings())
            env = {
                **os.environ,
                **minio.env(),
                "OMP_NUM_THREADS": "1",
                "MEDSEG_ENV_FILE": os.devnull,
            }
            print(
                f"{args.cases} cases of shape {tuple(args.shape)}, {cfg.model.name} "
                f"({cfg.model.init_filters} initial filters); {os.cpu_count()} CPUs, "
                f"load average {_load()} (1, 5, 15 min)"
            )
            times: dict[tuple[str, int], float] = {}
            for shards in (1, 2):
                started = time.perf_counter()
                _fan_out("start", shards, env)
                times["start", shards] = time.perf_counter() - started
                store = f"s3://bench-{shards}"
                storage.ensure_bucket(store)
                spec = str(ingest(str(root / "raw"), "bench", store, storage=storage).ref)
                started = time.perf_counter()
                _fan_out(
                    "preprocess",
                    shards,
                    env,
                    dataset=spec,
                    store=store,
                    cfg=cfg.model_dump(mode="json"),
                )
                index = collect_preprocessed(spec, store, cfg.data, shards, storage=storage).index
                times["preprocess", shards] = time.perf_counter() - started
                assert len(index["cases"]) == args.cases
                out = join(store, "predictions")
                started = time.perf_counter()
                _fan_out(
                    "predict", shards, env, dataset=spec, store=store, model=str(model), out=out
                )
                result = collect_predictions(
                    str(model), spec, "all", store, shards, out=out, storage=storage
                )
                times["predict", shards] = time.perf_counter() - started
                assert len(result.cases) == args.cases and not result.failed, out
            print(
                f"process start (imports only): 1 at once {times['start', 1]:.1f} s, "
                f"2 at once {times['start', 2]:.1f} s (in every figure below, once per shard)"
            )
            for step in ("preprocess", "predict"):
                one, two = times[step, 1], times[step, 2]
                print(
                    f"{step:<10} 1 shard {one:6.1f} s ({one / args.cases:.2f} s/case)   "
                    f"2 shards {two:6.1f} s ({two / args.cases:.2f} s/case)   "
                    f"speed-up {one / two:.2f}x"
                )
            print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
