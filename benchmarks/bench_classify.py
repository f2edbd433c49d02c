"""Skin-lesion classification throughput on the CPU engines: batch prediction and the server.

The skin task's DenseNet121 (seeded weights: they do not change the speed) at the task's input
size (``data.image_size``, 224 px by default), exported to ONNX next to its weights
(:func:`medseg.registry.export.export_model`), on ``--images`` synthetic dermoscopy JPEGs of
HAM10000's 600×450 (:mod:`medseg.data.skin_synth`). Per engine (``--engines``; ``torch`` is the
baseline of every ratio, measured in the same run):

A. Batch prediction: :func:`medseg.inference.classify.predict_images` over the folder (read, bounded
   decode, resize to the input size, forward in batches of :data:`medseg.inference.classify.BATCH`,
   CSV and JSON written), in a process of its own, after one warm-up image (OpenVINO compiles its
   plan there). Printed: model load seconds, images/s, the ratio against torch, and the
   process's peak RSS (``VmHWM``, so each engine's is its own).
B. The KServe server (``python -m model_server``, the container's entrypoint, on 127.0.0.1,
   with ``infer.engine`` set in ``model.yaml``) over REST v2 with the JPEG files as one binary
   BYTES input (:func:`medseg.serving.client.infer`), at 1 and 32 images per request, one client,
   after one warm-up request: images/s, the ratio against torch, the median request latency,
   and the server's peak RSS over the whole run (``VmHWM``: load, warm-up, both batch sizes).

C. (with ``openvino`` among the engines) OpenVINO's plan for the classifier, the network alone
   on 32 preprocessed images: one call of a plan whose batch alone is free (what the skin
   task's ``GraphSpec.plan_batch`` ``None`` runs) against 32 calls of a static batch-1 plan
   and one call of a static batch-32 plan; best of 3, the ratio against the free-batch plan.

    python benchmarks/bench_classify.py                      # 64 images, every engine
    python benchmarks/bench_classify.py --images 256 --engines torch,openvino
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _timing import median_time, peak_rss_mib

from medseg.apps.model_server_process import ModelServerProcess, write_seeded_model
from medseg.config import MedsegConfig
from medseg.core.storage import Storage
from medseg.data.skin_synth import MIN_PER_CLASS, encode_jpeg, make_image, plan_lesions
from medseg.inference.classify import image_sources, predict_images
from medseg.inference.engine import GRAPH_FILE
from medseg.inference.infer import load_model
from medseg.registry.export import export_model
from medseg.serving.client import infer, serialize_bytes
from medseg.tasks.skin import DEFAULT_IMAGE_SIZE, SKIN
from medseg.tasks.skin_classes import CHANNELS, CLASSES

ENGINES = ("torch", "onnxruntime", "openvino")
#: Images per request of part B.
REQUEST_BATCHES = (1, 32)
#: Fewest requests timed per batch size (with few images, they are sent again).
MIN_REQUESTS = 3


def _model(folder: Path, size: tuple[int, int]) -> Path:
    """The skin classifier at ``size`` px with seeded weights and its exported graph."""
    cfg = MedsegConfig.model_validate(
        {
            "task": {"kind": "skin-lesion-classification"},
            "data": {"channels": list(CHANNELS), "image_size": list(size)},
            "model": {"name": "DenseNet121", "in_channels": 3, "out_channels": len(CLASSES)},
        }
    )
    write_seeded_model(folder, cfg)
    export_model(str(folder), Storage())
    return folder


def _with_engine(model: Path, folder: Path, engine: str) -> Path:
    """A copy of ``model`` whose ``model.yaml`` sets ``infer.engine`` (what the server reads)."""
    folder.mkdir(parents=True)
    for name in ("model.pt", GRAPH_FILE):
        shutil.copy(model / name, folder / name)
    cfg = MedsegConfig.from_yaml((model / "model.yaml").read_bytes(), "model.yaml")
    cfg = cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"engine": engine})})
    (folder / "model.yaml").write_text(cfg.to_yaml())
    return folder


def _one(engine: str, work: Path) -> dict[str, Any]:
    """Part A for one engine, in this (child) process."""
    storage = Storage()
    started = time.perf_counter()
    seg = load_model(str(work / "model"), storage, device="cpu", engine=engine)  # type: ignore[arg-type]
    loaded = time.perf_counter() - started
    images = image_sources(storage, str(work / "images"))
    predict_images(seg, images[:1], str(work / "warm" / engine), storage)  # OpenVINO's plan
    started = time.perf_counter()
    done = predict_images(seg, images, str(work / "out" / engine), storage)
    seconds = time.perf_counter() - started
    if done.failures:
        raise SystemExit(f"{engine}: images failed: {done.failures}")
    return {
        "engine": seg.engine,
        "load_s": loaded,
        "images_per_s": len(images) / seconds,
        "peak_rss_mib": peak_rss_mib(),
    }


def batch_predict(engines: list[str], work: Path, n: int) -> None:
    print(f"\nA. batch prediction (predict_images), {n} images, one process per engine")
    print(f"{'engine':12} {'load s':>7} {'images/s':>9} {'vs torch':>9} {'peak RSS MiB':>13}")
    base = None
    for engine in engines:
        out = subprocess.run(
            [sys.executable, __file__, "--one", engine, "--work", str(work)],
            check=True,
            capture_output=True,
            text=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        base = row["images_per_s"] if engine == "torch" else base
        ratio = f"{row['images_per_s'] / base:.2f}x" if base else "-"
        print(
            f"{engine:12} {row['load_s']:7.1f} {row['images_per_s']:9.1f} {ratio:>9} "
            f"{row['peak_rss_mib']:13.0f}",
            flush=True,
        )


def _requests(server: ModelServerProcess, blobs: list[bytes], batch: int) -> tuple[float, float]:
    """Images/s and median latency (s) of one client sending ``batch`` images per request."""
    count = max(MIN_REQUESTS, math.ceil(len(blobs) / batch))
    payloads = []
    for r in range(count):
        files = [blobs[(r * batch + i) % len(blobs)] for i in range(batch)]
        payloads.append(serialize_bytes(files))
    latencies = []
    started = time.perf_counter()
    for payload in payloads:
        t = time.perf_counter()
        _send(server, payload, batch)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    return count * batch / wall, statistics.median(latencies)


def _send(server: ModelServerProcess, payload: bytes, batch: int) -> None:
    image = {"name": "image", "datatype": "BYTES", "shape": [batch], "parameters": {}}
    infer(server.url, "medseg", image, payload, {}, ["probabilities"], 600)


def serving(engines: list[str], model: Path, blobs: list[bytes], work: Path) -> None:
    print(f"\nB. KServe server, REST v2, JPEG files as binary BYTES, {len(blobs)} images, 1 client")
    header = f"{'engine':12} {'batch':>5} {'images/s':>9} {'vs torch':>9} {'p50 ms':>8}"
    print(f"{header} {'server peak RSS MiB':>20}")
    base: dict[int, float] = {}
    for engine in engines:
        folder = _with_engine(model, work / f"served-{engine}", engine)
        server = ModelServerProcess(folder, work / f"server-{engine}.log").start(timeout=600)
        try:
            _send(server, serialize_bytes(blobs[:1]), 1)  # warm-up: OpenVINO's plan (batch 1)
            rows = {batch: _requests(server, blobs, batch) for batch in REQUEST_BATCHES}
            peak = peak_rss_mib(server.pid)
        finally:
            server.stop()
        for batch, (rate, p50) in rows.items():
            if engine == "torch":
                base[batch] = rate
            ratio = f"{rate / base[batch]:.2f}x" if batch in base else "-"
            print(
                f"{engine:12} {batch:5} {rate:9.1f} {ratio:>9} {p50 * 1000:8.0f} {peak:20.0f}",
                flush=True,
            )


def openvino_plans(model: Path, n: int = 32, rounds: int = 3) -> None:
    import numpy as np

    from medseg.inference.engine import openvino

    ov = openvino()
    cfg = MedsegConfig.from_yaml((model / "model.yaml").read_bytes(), "model.yaml")
    spec = SKIN.graph_spec(cfg)
    images = np.random.default_rng(0).random((n, *spec.example[1:]), dtype=np.float32)
    core = ov.Core()
    props = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}

    def compiled(batch: int) -> Any:
        graph = core.read_model(model / GRAPH_FILE)
        graph.reshape({"image": [batch, *spec.example[1:]]})
        return core.compile_model(graph, "CPU", props).create_infer_request()

    free, one, whole = compiled(-1), compiled(1), compiled(n)
    calls = {
        f"free batch, 1 call of {n} (what runs)": lambda: free.infer({"image": images}),
        f"static batch 1, {n} calls": lambda: [
            one.infer({"image": images[i : i + 1]}) for i in range(n)
        ],
        f"static batch {n}, 1 call": lambda: whole.infer({"image": images}),
    }
    print(f"\nC. OpenVINO plans, the network alone on {n} images of {list(spec.example[1:])}")
    base = None
    for name, call in calls.items():
        call()  # warm-up
        seconds = min(median_time(call, 1) for _ in range(rounds))
        base = base or seconds
        print(f"  {name:38} {seconds:7.3f} s  {n / seconds:7.1f} images/s  {base / seconds:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="Synthetic JPEGs to classify.")
    parser.add_argument("--engines", default=",".join(ENGINES), help="Comma-separated.")
    parser.add_argument("--size", type=int, nargs=2, default=list(DEFAULT_IMAGE_SIZE))
    parser.add_argument("--skip", default="", help="Parts to skip, e.g. 'A' or 'BC'.")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, Path(args.work))))
        return
    engines = args.engines.split(",")
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; known: {', '.join(ENGINES)}")
    with tempfile.TemporaryDirectory(prefix="bench-classify-") as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        planned = plan_lesions(max(args.images, MIN_PER_CLASS * len(CLASSES)), seed=0)
        for p in planned[: args.images]:
            (work / "images" / f"{p.image_id}.jpg").write_bytes(encode_jpeg(make_image(p), p))
        blobs = [f.read_bytes() for f in sorted((work / "images").iterdir())]
        model = _model(work / "model", tuple(args.size))
        print(
            f"{len(blobs)} synthetic dermoscopy JPEGs of 600x450, DenseNet121 at "
            f"{args.size[0]}x{args.size[1]} px, CPU: {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}; load average at the start {os.getloadavg()}"
        )
        if "A" not in args.skip:
            batch_predict(engines, work, len(blobs))
        if "B" not in args.skip:
            serving(engines, model, blobs, work)
        if "C" not in args.skip and "openvino" in engines:
            openvino_plans(model)
    print(f"load average at the end: {os.getloadavg()}")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
