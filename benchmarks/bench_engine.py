"""CPU inference engines on a full-size case, against the PyTorch path in the same run.

Part A (latency): the default SegResNet (init_filters 16) with seeded weights (the weights do not
change the speed), exported to ONNX next to them, segments one synthetic full-size case
(4×240×240×155, ``medseg.data.synth``; 183×206×136 after the foreground crop) through
:func:`medseg.inference.infer.segment_case` once per variant. ``torch`` is the served default before
``infer.window`` existed and the baseline of every ratio: PyTorch, ``window: sliding``, ROI
96×96×64, overlap 0.25. ``*-volume`` variants run the whole cropped volume as one window
(today's default). Each variant runs in a process of its own so its peak RSS (``VmHWM``) is its
own. Printed: load seconds, segment seconds (for OpenVINO, compiling the plan of the case's
shape included), the speed-up against ``torch`` and peak RSS.

Part B (equal Dice, with ``--model``): a trained model artifact (e.g. the demo's registered
``s3://medseg/models/demo-segresnet/v1``, MinIO from the environment) is exported unless it
carries its graph already (a registered version does), then its held-out validation split is
scored by :func:`medseg.evaluation.evaluate.evaluate` (served label maps) once per variant of
:data:`DICE_VARIANTS` (engine and window, the model's other settings as they are); printed:
mean Dice and per region, and |ΔDice| against ``torch`` (sliding windows). The WT volume
column of part A is a cross-check that the engines agree on the full-size case too.
Run ``torch`` first: the ratios are against it.

Part C (``--per-voxel``): what bounds an engine at equal output. Sliding windows compute some
voxels several times (MONAI's own window grid, ``monai.data.utils.dense_patch_slices``); the
redundancy printed is the voxels the windows compute over the voxels of the padded volume. Each
engine's network alone (the exported graph, no pre- or post-processing) is timed on one window
and on the whole cropped volume of the part A case, best of ``--rounds``, in µs per voxel and as
a speed-up against PyTorch's. A sliding-window run on an engine cannot be faster than torch's by
more than that engine's window speed-up: the same windows are computed.

    python benchmarks/bench_engine.py                        # part A, every variant
    python benchmarks/bench_engine.py --only torch,openvino-volume  # some variants
    python benchmarks/bench_engine.py --skip-latency --model s3://medseg/models/demo-segresnet/v1
    python benchmarks/bench_engine.py --skip-latency --per-voxel --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.apps.model_server_process import write_seeded_model
from medseg.artifact.files import trained_on
from medseg.config import MedsegConfig
from medseg.core.storage import Storage, join
from medseg.data.synth import make_case
from medseg.inference.engine import GRAPH_FILE, graph_forward, weights_digest
from medseg.inference.infer import load_model, pad_to_multiple, recorded_hashes, segment_case
from medseg.registry.export import export_model
from medseg.tasks.networks import size_multiple

FULL = (240, 240, 155)
#: Today's served default before ``infer.window`` existed: overlapping 96x96x64 windows.
SLIDING: dict[str, Any] = {"window": "sliding"}
VOLUME: dict[str, Any] = {"window": "volume"}
#: name -> (engine, InferConfig overrides, torch.compile the network)
VARIANTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "torch": ("torch", SLIDING, False),
    "torch-sw4": ("torch", {**SLIDING, "sw_batch_size": 4}, False),
    "torch-channels-last": ("torch", {**SLIDING, "channels_last": True}, False),
    "torch-compile": ("torch", SLIDING, True),
    "torch-roi128": ("torch", {**SLIDING, "roi_size": (128, 128, 128), "overlap": 0.1}, False),
    "onnxruntime": ("onnxruntime", SLIDING, False),
    "onnxruntime-sw4": ("onnxruntime", {**SLIDING, "sw_batch_size": 4}, False),
    "openvino": ("openvino", SLIDING, False),
    "openvino-sw4": ("openvino", {**SLIDING, "sw_batch_size": 4}, False),
    "torch-volume": ("torch", VOLUME, False),
    "torch-volume-channels-last": ("torch", {**VOLUME, "channels_last": True}, False),
    "onnxruntime-volume": ("onnxruntime", VOLUME, False),
    "openvino-volume": ("openvino", VOLUME, False),
    "openvino-volume-bf16": ("openvino", {**VOLUME, "precision": "bf16"}, False),
}
#: Part B: name -> (engine, InferConfig overrides of the model's own config).
DICE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "torch": ("torch", SLIDING),
    "openvino": ("openvino", SLIDING),
    "torch-volume": ("torch", VOLUME),
    "torch-volume-channels-last": ("torch", {**VOLUME, "channels_last": True}),
    "onnxruntime-volume": ("onnxruntime", VOLUME),
    "openvino-volume": ("openvino", VOLUME),
    "openvino-volume-bf16": ("openvino", {**VOLUME, "precision": "bf16"}),
}


def _artifact(base: Path, folder: Path, infer: dict[str, Any]) -> str:
    """A copy of the base artifact (weights and graph) with ``infer`` overrides in its config.

    The graph has a free batch size, so one export serves every ``sw_batch_size``.
    """
    cfg = MedsegConfig.model_validate({"infer": infer})
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.pt", GRAPH_FILE):
        shutil.copy(base / name, folder / name)
    (folder / "model.yaml").write_text(cfg.to_yaml())
    return str(folder)


def _base(folder: Path) -> Path:
    """The served default with seeded weights, exported; and the full-size case, once."""
    cfg = MedsegConfig()
    base = write_seeded_model(folder / "base", cfg)
    started = time.perf_counter()
    export_model(str(base), Storage())
    print(f"export: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    case = make_case(0, shape=FULL, seed=0)
    np.save(base / "image.npy", case.image)
    np.save(base / "affine.npy", case.affine)
    return base


def _one(name: str, folder: Path) -> dict[str, Any]:
    """Run one variant in this process: load, segment the full-size case once."""
    engine, infer, compiled = VARIANTS[name]
    base = folder / "base"
    uri = _artifact(base, folder / name, infer)
    image, affine = np.load(base / "image.npy"), np.load(base / "affine.npy")
    started = time.perf_counter()
    seg = load_model(uri, Storage(), device="cpu", engine=engine)  # type: ignore[arg-type]
    if compiled:
        seg.net = torch.compile(seg.net)  # type: ignore[assignment]
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    result = segment_case(seg, image, affine)
    seconds = time.perf_counter() - started
    return {
        "variant": name,
        "engine": seg.engine,
        "load_s": loaded,
        "segment_s": seconds,
        "peak_rss_mib": _peak_rss_mib(),
        "wt_ml": result.volumes_ml["WT"],
    }


def _peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``): ``ru_maxrss`` would keep the parent's across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _row(r: dict[str, Any], base: float | None) -> str:
    ratio = f"{base / r['segment_s']:.2f}x" if base else "-"
    return (
        f"{r['variant']:27} {r['load_s']:7.1f} {r['segment_s']:10.1f} {ratio:>9} "
        f"{r['peak_rss_mib']:13.0f} {r['wt_ml']:8.1f}"
    )


def latency(names: list[str], rounds: int) -> None:
    print(f"full-size case {FULL}, SegResNet init_filters 16, CPU, vs torch", flush=True)
    print("(torch: window sliding, ROI 96x96x64, overlap 0.25)", flush=True)
    print(f"load average at the start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        _base(Path(tmp))
        header = f"{'variant':27} {'load s':>7} {'segment s':>10} {'vs torch':>9} "
        print(header + f"{'peak RSS MiB':>13} {'WT mL':>8}", flush=True)
        best: dict[str, dict[str, Any]] = {}
        for _ in range(rounds):  # variants interleaved, so a change of load hits them all
            for name in names:
                out = subprocess.run(
                    [sys.executable, __file__, "--one", name, "--folder", tmp],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                base = best.get("torch", row)["segment_s"] if "torch" in names else None
                print(_row(row, base), flush=True)
                if name not in best or row["segment_s"] < best[name]["segment_s"]:
                    best[name] = row
        if rounds > 1:
            print(f"best of {rounds} rounds:")
            base = best["torch"]["segment_s"] if "torch" in best else None
            for name in names:
                print(_row(best[name], base), flush=True)
    print(f"load average at the end: {os.getloadavg()}")


def per_voxel(rounds: int) -> None:
    """Part C: each engine's network per voxel, on a window and on the whole volume."""
    from monai.data import MetaTensor
    from monai.data.utils import dense_patch_slices

    from medseg.data.transforms import static_transforms

    cfg, infer = MedsegConfig(), MedsegConfig().infer
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        base = _base(Path(tmp))
        image = MetaTensor(np.load(base / "image.npy"), affine=np.load(base / "affine.npy"))
        pre = static_transforms(cfg.data, load=False)({"image": image})["image"].as_tensor()
        volume = pad_to_multiple(pre[None].float(), size_multiple(cfg.model))
        spatial = tuple(volume.shape[2:])
        interval = tuple(int(r * (1 - infer.overlap)) for r in infer.roi_size)
        windows = len(dense_patch_slices(spatial, infer.roi_size, interval))
        redundancy = windows * math.prod(infer.roi_size) / math.prod(spatial)
        print(f"cropped, padded volume {spatial}: {windows} windows of {infer.roi_size} at")
        print(f"overlap {infer.overlap} compute {redundancy:.2f}x its voxels")
        print(f"load average at the start: {os.getloadavg()}", flush=True)
        window = torch.randn(1, cfg.model.in_channels, *infer.roi_size)
        ratio = f"{'vs torch':>9}"
        print(f"{'engine':12} {'window us/vox':>14} {ratio} {'volume us/vox':>14} {ratio}")
        first: tuple[float, float] | None = None
        for engine in ("torch", "onnxruntime", "openvino"):
            seg = load_model(str(base), Storage(), device="cpu", engine=engine)
            costs = []
            for x in (window, volume):
                seconds = []
                with torch.no_grad():
                    run = seg.forward or seg.net
                    run(x)  # warm-up (OpenVINO compiles the plan of this shape)
                    for _ in range(rounds):
                        started = time.perf_counter()
                        run(x)
                        seconds.append(time.perf_counter() - started)
                costs.append(min(seconds) / math.prod(x.shape[2:]) * 1e6)
            first = first or (costs[0], costs[1])
            print(
                f"{engine:12} {costs[0]:14.2f} {first[0] / costs[0]:8.2f}x "
                f"{costs[1]:14.2f} {first[1] / costs[1]:8.2f}x",
                flush=True,
            )
    print(f"load average at the end: {os.getloadavg()}")


def dice(
    model: str, names: list[str], out: str, dataset: str | None = None, split: str = "validation"
) -> None:
    from medseg.evaluation.evaluate import evaluate
    from medseg.inference.predict import predict

    storage = Storage()
    trained = trained_on(model, storage)  # the split is in the store the model was trained in
    if GRAPH_FILE not in recorded_hashes(model, storage)[1]:
        export_model(model, storage)  # a version registered with its graph has one already
    means = {}
    for name in names:
        engine, infer = DICE_VARIANTS[name]
        seg = load_model(model, storage, device="cpu", engine=engine)  # type: ignore[arg-type]
        seg.cfg = seg.cfg.model_copy(update={"infer": seg.cfg.infer.model_copy(update=infer)})
        if seg.cfg.infer.precision != "f32":  # plans are compiled for the precision at load
            weights = storage.get_bytes(join(model, "model.pt"))
            graph = storage.get_bytes(join(model, GRAPH_FILE))
            seg.forward = graph_forward(engine, graph, seg.cfg, weights_digest(weights), model)
        started = time.perf_counter()
        spec = dataset or trained.dataset
        pred = predict(
            model, dataset=spec, split=split, store=trained.store, storage=storage, segmenter=seg
        )
        result = evaluate(
            model,
            pred.out,
            dataset=dataset,
            split=split,
            storage=storage,
            segmenter=seg,
            out=join(out, name),
            max_overlays=0,
        )
        means[name] = (result.dice_mean, result.dice, time.perf_counter() - started)
    base = means[names[0]][0]
    cases = f"split {split!r} of {dataset}" if dataset else "held-out validation split"
    print(f"{cases}, {model}, served label maps (medseg.evaluation.evaluate)")
    print(f"|dDice| against {names[0]}; load average {os.getloadavg()}")
    regions = " ".join(f"{r:>7}" for r in ("TC", "WT", "ET"))
    print(f"{'variant':27} {'mean Dice':>10} {'|dDice|':>8} {regions} {'eval s':>7}")
    for name, (mean, per, seconds) in means.items():
        regions = " ".join(f"{per[r]:7.4f}" for r in ("TC", "WT", "ET"))
        print(f"{name:27} {mean:10.4f} {abs(mean - base):8.4f} {regions} {seconds:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(VARIANTS))
    parser.add_argument("--model", help="A trained model artifact for the Dice part.")
    parser.add_argument("--dice-only", default=",".join(DICE_VARIANTS), help="Part B variants.")
    parser.add_argument("--out", default="/tmp/bench-engine-eval")
    parser.add_argument(
        "--dataset", help="Part B on NAME@VERSION (in the model's training store), not its own."
    )
    parser.add_argument("--split", default="validation", help="Part B's split of --dataset.")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--per-voxel", action="store_true", help="Part C: network per voxel.")
    parser.add_argument("--rounds", type=int, default=1, help="Latency rounds; best is kept.")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, Path(args.folder))))
        return
    if not args.skip_latency:
        latency(args.only.split(","), args.rounds)
    if args.per_voxel:
        per_voxel(max(args.rounds, 2))
    if args.model:
        dice(args.model, args.dice_only.split(","), args.out, args.dataset, args.split)


if __name__ == "__main__":
    main()
