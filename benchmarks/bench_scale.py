"""Cost per case of every data step at full BraTS size, as the number of cases N grows.

For each N (default 8, 16, 32) the first N of one set of full-size synthetic cases
(4 x 240 x 240 x 155, :func:`medseg.data.synth.write_dataset`) go through the real steps against a
real MinIO on 127.0.0.1, each step in a fresh process of its own:

* ``ingest``: :func:`medseg.data.ingest.ingest` of the raw folder (``--workers`` processes);
* ``preprocess``: :func:`medseg.data.preprocess.preprocess` (``--workers`` processes);
* ``loader-cold``: one epoch of the training DataLoader (:func:`medseg.training.train.train_loader`:
  the training split through the local cache and the random chain, default ``TrainConfig``, no
  network), the cache empty: every case is fetched from MinIO;
* ``loader-warm``: the same epoch again, every case in the local cache (a later epoch);
* ``predict``: :func:`medseg.inference.predict.predict` of the whole dataset with an untrained model
  artifact (default config, SegResNet of ``--init-filters``; the weights do not change the cost);
* ``evaluate``: :func:`medseg.evaluation.evaluate.evaluate` of those predictions (no overlays).

Per step and N it prints: seconds per case (wall of the step's call / cases it handled; imports
of the step's process are outside it, its worker pools' start-up inside), CPU utilisation (CPU
seconds of the step's process and all its children / wall / cores), the peak RSS of the step's
process tree (the RSS of the process and its children summed, sampled every 0.1 s; shared pages
count once per process, so it overstates a pod's working set) and of its largest process
(sampled), the bytes the step added to the store, the peak of its local disk (its scratch folder,
``TMPDIR``, and the loader's cache, sampled) and MinIO's CPU seconds during the step.

Baselines in the same run: the smallest N. Per step it prints s/case, CPU s/case and peak RSS at
the largest N against the smallest (flat: ~1.0x; below 1: a fixed cost spread over more cases),
the least-squares fits ``wall = fixed + per_case * cases`` and ``CPU = fixed + per_case *
cases``, and what they extrapolate to for 1,251 and 10,000 cases on 1, 4 and 16 pods (the
figures of docs/scaling.md): once as measured here, once on pods whose cores are their own.
``--json`` keeps the measurements; ``--report FILE`` prints the summary of such a file again.
Everything is removed afterwards; peak disk use is ~140 MB per case of the largest N (raw files,
their copy in MinIO, the preprocessed cases in MinIO and in the loader's cache).

Usage: ``python benchmarks/bench_scale.py [--cases 8,16,32] [--workers 2] [--init-filters 16]
[--steps ingest,preprocess]`` (``--steps``: a prefix of the steps' order, since each step reads
what the one before wrote; default all).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil

from medseg.apps.minio_server import MinioServer
from medseg.apps.model_server_process import write_seeded_model
from medseg.config import DataConfig, MedsegConfig, TrainConfig
from medseg.core.storage import Storage
from medseg.data.ingest import ingest
from medseg.data.manifest import DatasetRef
from medseg.data.preprocess import preprocess, preprocessed_prefix
from medseg.data.synth import write_dataset
from medseg.evaluation.evaluate import evaluate
from medseg.inference.predict import predict
from medseg.training.train import train_loader

BUCKET = "s3://bench"
STEPS = ("ingest", "preprocess", "loader-cold", "loader-warm", "predict", "evaluate")
SAMPLE_SECONDS = 0.1


@dataclass
class StepCost:
    """What one step cost at one N (see the module docstring for each field)."""

    step: str
    n: int
    cases: int
    wall_s: float
    cpu_s: float
    tree_rss_peak: int
    largest_rss: int
    local_peak: int
    store_bytes: int = 0
    store_cpu_s: float = 0.0

    @property
    def s_per_case(self) -> float:
        return self.wall_s / max(1, self.cases)

    def cpu_util(self, cores: int) -> float:
        return self.cpu_s / self.wall_s / cores


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(path, name)).st_size
            except FileNotFoundError:
                continue  # an atomic write's temp file renamed in between
    return total


def _tree() -> list[psutil.Process]:
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def _cpu_seconds() -> float:
    """CPU seconds of this process, its reaped children, and its children still alive."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
    for proc in _tree()[1:]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


class _Sampler:
    """Samples this process tree's RSS (summed, and its largest process) and local folders."""

    def __init__(self, folders: list[Path]):
        self.folders = folders
        self.rss_peak = 0
        self.largest_peak = 0
        self.local_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _sample(self) -> None:
        sizes = []
        for proc in _tree():
            try:
                sizes.append(proc.memory_info().rss)
            except psutil.Error:
                continue
        self.rss_peak = max(self.rss_peak, sum(sizes))
        self.largest_peak = max(self.largest_peak, *sizes)
        local = sum(_folder_bytes(f) for f in self.folders)
        self.local_peak = max(self.local_peak, local)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sample()

    def __enter__(self) -> _Sampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _model_config(init_filters: int) -> MedsegConfig:
    return MedsegConfig.model_validate({"model": {"init_filters": init_filters}})


def _run_step(step: str, n: int, work: Path, store: str, workers: int) -> int:
    """Run ``step`` on the dataset of ``n`` cases in this process; returns the cases handled."""
    storage = Storage()
    name = f"scale{n}"
    out = f"{store}/scale/{n}"
    if step == "ingest":
        return _ingest(work / f"raw-{n}", name, store, storage, workers)
    if step == "preprocess":
        done = preprocess(name, store, DataConfig(), storage, workers, progress=False)
        return len(done.index["cases"])
    if step in ("loader-cold", "loader-warm"):
        return _epoch(name, store, storage)
    if step == "predict":
        spec = _spec(name, store, storage)
        result = predict(str(work / "model"), f"{out}/predictions", dataset=spec, split="all",
                         store=store, storage=storage)  # fmt: skip
        if result.failed:
            raise SystemExit(f"predict: {len(result.failed)} cases failed: {result.failed[:3]}")
        return len(result.cases)
    if step == "evaluate":
        spec = _spec(name, store, storage)
        scored = evaluate(str(work / "model"), dataset=spec, store=store, split="all",
                          storage=storage, predictions=f"{out}/predictions", out=f"{out}/eval",
                          max_overlays=0)  # fmt: skip
        return len(scored.cases)
    raise SystemExit(f"unknown step {step!r}: use one of {', '.join(STEPS)}")


def _ingest(source: Path, name: str, store: str, storage: Storage, workers: int) -> int:
    result = ingest(str(source), name, store, storage=storage, workers=workers)
    if result.manifest.quarantined:
        raise SystemExit(f"ingest quarantined cases: {result.manifest.quarantined[:3]}")
    return len(result.manifest.cases)


def _spec(name: str, store: str, storage: Storage) -> str:
    return str(DatasetRef.resolve(storage, store, name))


def _epoch(name: str, store: str, storage: Storage) -> int:
    """One epoch of the real training loader over the training split; returns its cases."""
    prefix = preprocessed_prefix(DatasetRef.resolve(storage, store, name), DataConfig())
    loader, sampler = train_loader(prefix, TrainConfig(), storage.settings)
    sampler.set_epoch(0)
    cases = 0
    for batch in loader:
        cases += int(batch["image"].shape[0])
    del loader, sampler  # shuts the (persistent) workers down: their CPU is then reaped
    gc.collect()
    return cases


def child_main(args: argparse.Namespace) -> None:
    """Measure one step in this process and write its :class:`StepCost` as JSON."""
    work = Path(args.work)
    folders = [Path(tempfile.gettempdir()), Path(os.environ["MEDSEG_CACHE_DIR"])]
    cpu0 = _cpu_seconds()
    started = time.perf_counter()
    with _Sampler(folders) as sampler:
        cases = _run_step(args.step, args.n, work, BUCKET, args.workers)
    wall = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu0
    cost = StepCost(
        args.step,
        args.n,
        cases,
        wall,
        cpu,
        sampler.rss_peak,
        sampler.largest_peak,
        sampler.local_peak,
    )
    Path(args.result).write_text(json.dumps(asdict(cost)))


def _store_bytes(storage: Storage) -> int:
    return sum(o.size for o in storage.list(BUCKET))


def _measure(
    step: str, n: int, work: Path, workers: int, env: dict[str, str], minio: psutil.Process
) -> StepCost:
    """Run one step in a fresh process; add what the store gained and MinIO's CPU."""
    storage = Storage()
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    result = work / "result.json"
    before, minio_cpu = _store_bytes(storage), sum(minio.cpu_times()[:2])
    cmd = [sys.executable, __file__, "--step", step, "--n", str(n), "--work", str(work),
           "--workers", str(workers), "--result", str(result)]  # fmt: skip
    subprocess.run(cmd, check=True, env={**env, "TMPDIR": str(scratch)})
    cost = StepCost(**json.loads(result.read_text()))
    cost.store_bytes = _store_bytes(storage) - before
    cost.store_cpu_s = sum(minio.cpu_times()[:2]) - minio_cpu
    shutil.rmtree(scratch, ignore_errors=True)
    return cost


def _link_cases(raw: Path, dest: Path, n: int) -> None:
    """``dest`` holds the first ``n`` case folders of ``raw``, as hard links (no disk used)."""
    cases = sorted(p for p in raw.iterdir() if p.is_dir())[:n]
    for case in cases:
        (dest / case.name).mkdir(parents=True)
        for f in case.iterdir():
            os.link(f, dest / case.name / f.name)


MiB = 2**20


def _print_table(costs: list[StepCost], cores: int) -> None:
    print(
        f"{'step':<12}{'N':>4}{'cases':>6}{'wall s':>9}{'s/case':>8}{'CPU util':>9}"
        f"{'tree RSS MiB':>13}{'largest MiB':>12}{'store MiB':>10}{'local MiB':>10}"
        f"{'MinIO CPU s':>12}"
    )
    for c in costs:
        print(
            f"{c.step:<12}{c.n:>4}{c.cases:>6}{c.wall_s:>9.1f}{c.s_per_case:>8.2f}"
            f"{c.cpu_util(cores):>9.2f}{c.tree_rss_peak / MiB:>13.0f}{c.largest_rss / MiB:>12.0f}"
            f"{c.store_bytes / MiB:>10.1f}{c.local_peak / MiB:>10.1f}{c.store_cpu_s:>12.1f}"
        )


def _line(xs: list[float], ys: list[float], total: float) -> tuple[float, float]:
    """``(fixed, per_case)`` of ``ys = fixed + per_case * xs`` by least squares.

    When noise swamps the fixed cost (a negative intercept or slope), the line goes through 0:
    ``per_case = sum(ys) / sum(xs)``, which charges the fixed cost to the cases (an upper bound).
    """
    if len(set(xs)) > 1:
        slope, intercept = np.polyfit(xs, ys, 1)
        if intercept >= 0 and slope > 0:
            return float(intercept), float(slope)
    return 0.0, sum(ys) / total


#: Cores a step keeps busy on a dedicated pod: its worker processes or torch's threads; the
#: evaluation's scoring (scipy, numpy) runs in one thread.
SINGLE_THREADED = ("evaluate",)


@dataclass
class StepFit:
    """One step's constants over the Ns: wall and CPU as ``fixed + per_case * cases``."""

    step: str
    fixed_s: float
    per_case_s: float
    cpu_fixed_s: float
    cpu_per_case_s: float
    share: float  # cases the step handles per case of the dataset (the loader: the train split)
    store_bytes_per_case: float
    local_bytes_per_case: float

    def hours(self, n: int, pods: int) -> float:
        """Wall hours of ``n`` dataset cases split evenly over ``pods`` pods, as measured here."""
        return (self.fixed_s + math.ceil(n * self.share / pods) * self.per_case_s) / 3600

    def dedicated_hours(self, n: int, pods: int, cores: int) -> float:
        """The same on pods of ``cores`` cores of their own: CPU seconds / cores the step uses."""
        used = 1 if self.step in SINGLE_THREADED else cores
        cpu = self.cpu_fixed_s + math.ceil(n * self.share / pods) * self.cpu_per_case_s
        return cpu / used / 3600


def _fit(rows: list[StepCost]) -> StepFit:
    cases = [float(c.cases) for c in rows]
    total = sum(cases)
    fixed, per_case = _line(cases, [c.wall_s for c in rows], total)
    cpu_fixed, cpu_per_case = _line(cases, [c.cpu_s for c in rows], total)
    return StepFit(
        rows[0].step,
        fixed,
        per_case,
        cpu_fixed,
        cpu_per_case,
        total / sum(c.n for c in rows),
        sum(c.store_bytes for c in rows) / total,
        sum(c.local_peak for c in rows) / total,
    )


def _print_ratios(costs: list[StepCost]) -> list[StepFit]:
    print(
        "\nlargest N against smallest N (the baseline; flat = 1.00x), and the fits "
        "wall = fixed + per_case * cases, CPU = fixed + per_case * cases"
    )
    print(
        f"{'step':<12}{'s/case x':>9}{'CPU/case x':>11}{'tree RSS x':>11}{'largest x':>10}"
        f"{'fixed s':>8}{'s/case':>7}{'CPU fixed':>10}{'CPU/case':>9}{'store MiB/case':>15}"
        f"{'local MiB/case':>15}"
    )
    fits = []
    for step in STEPS:
        rows = sorted((c for c in costs if c.step == step), key=lambda c: c.n)
        if not rows:
            continue
        lo, hi, fit = rows[0], rows[-1], _fit(rows)
        fits.append(fit)
        cpu_ratio = (hi.cpu_s / hi.cases) / (lo.cpu_s / lo.cases)
        print(
            f"{step:<12}{hi.s_per_case / lo.s_per_case:>8.2f}x{cpu_ratio:>10.2f}x"
            f"{hi.tree_rss_peak / lo.tree_rss_peak:>10.2f}x{hi.largest_rss / lo.largest_rss:>9.2f}x"
            f"{fit.fixed_s:>8.1f}{fit.per_case_s:>7.2f}{fit.cpu_fixed_s:>10.1f}"
            f"{fit.cpu_per_case_s:>9.2f}{fit.store_bytes_per_case / MiB:>15.1f}"
            f"{fit.local_bytes_per_case / MiB:>15.1f}"
        )
    return fits


#: What docs/scaling.md extrapolates to: BraTS 2021's cases and an archive's, on 1, 4, 16 pods.
TARGETS = (1251, 10000)
PODS = (1, 4, 16)


def _print_extrapolation(fits: list[StepFit], cores: int) -> None:
    head = f"{'step':<12}" + "".join(f"{f'{n} / {p} pods':>16}" for n in TARGETS for p in PODS)
    ways: list[tuple[str, Callable[[StepFit, int, int], float]]] = [
        ("as measured here: fixed + ceil(cases / pods) * s/case", StepFit.hours),
        (
            f"pods of {cores} cores of their own: CPU s / cores the step keeps busy",
            lambda f, n, p: f.dedicated_hours(n, p, cores),
        ),
    ]
    for title, hours in ways:
        print(f"\nextrapolated hours, {title} (pods in parallel, store bandwidth not the limit)")
        print(head)
        for fit in fits:
            print(
                f"{fit.step:<12}"
                + "".join(f"{hours(fit, n, p):>16.2f}" for n in TARGETS for p in PODS)
            )
        once = [f for f in fits if f.step != "loader-warm"]  # a pipeline run's steps, one epoch
        row = [sum(hours(f, n, p) for f in once) for n in TARGETS for p in PODS]
        print(f"{'pipeline':<12}" + "".join(f"{h:>16.2f}" for h in row))
    stored = sum(f.store_bytes_per_case * f.share for f in fits)
    print(
        f"\nstore written per dataset case {stored / MiB:.0f} MiB: "
        + ", ".join(f"{n} cases {stored * n / 2**30:.0f} GiB" for n in TARGETS)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="8,16,32", help="the Ns, comma-separated")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    parser.add_argument("--init-filters", type=int, default=16, help="of the predict model")
    parser.add_argument("--raw", help="reuse (or fill) this folder of generated cases")
    parser.add_argument("--json", help="also write every measurement to this file")
    parser.add_argument("--report", help="print the summary of a --json file, measure nothing")
    parser.add_argument("--steps", default=",".join(STEPS), help="the steps to measure, in order")
    # One measured step in a process of its own (how main runs each step):
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        child_main(args)
        return
    if args.report:
        costs = [StepCost(**c) for c in json.loads(Path(args.report).read_text())]
        _print_table(costs, os.cpu_count() or 1)
    else:
        ns = sorted({int(x) for x in args.cases.split(",")})
        steps = tuple(args.steps.split(","))
        if steps != STEPS[: len(steps)]:
            parser.error(f"--steps must be a prefix of {','.join(STEPS)}: each reads the last")
        costs = run(ns, args.workers, tuple(args.shape), args.init_filters, args.raw, steps)
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(c) for c in costs], indent=1))
    _print_extrapolation(_print_ratios(costs), os.cpu_count() or 1)


def run(
    ns: list[int],
    workers: int,
    shape: tuple[int, int, int],
    init_filters: int,
    raw: str | None,
    steps: tuple[str, ...] = STEPS,
) -> list[StepCost]:
    """Generate the cases, start MinIO, measure the steps at every N; clean up after."""
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="medseg-bench-scale-"))
    try:
        source = Path(raw) if raw else work / "raw"
        have = [p for p in source.iterdir() if p.is_dir()] if source.is_dir() else []
        t0 = time.perf_counter()
        if len(have) < max(ns):
            write_dataset(source, "brats2021", max(ns), shape, seed=0)
        print(
            f"{max(ns)} synthetic cases of 4 x {shape} ({_folder_bytes(source) / MiB:.0f} MiB "
            f"of .nii.gz) ready in {time.perf_counter() - t0:.0f} s; "
            f"{workers} workers, {cores} cores, load average {os.getloadavg()}"
        )
        cfg = _model_config(init_filters)
        write_seeded_model(work / "model", cfg)

        costs: list[StepCost] = []
        with MinioServer(work / "minio") as server:
            minio = next(p for p in psutil.Process().children() if p.name() == "minio")
            env = {**os.environ, **server.env(), "MEDSEG_ENV_FILE": os.devnull}
            os.environ.update(env)
            storage = Storage(server.settings())
            storage.ensure_bucket(BUCKET)
            for n in ns:
                _link_cases(source, work / f"raw-{n}", n)
                env["MEDSEG_CACHE_DIR"] = str(work / f"cache-{n}")
                Path(env["MEDSEG_CACHE_DIR"]).mkdir()
                for step in steps:
                    cost = _measure(step, n, work, workers, env, minio)
                    costs.append(cost)
                    print(
                        f"  N={n:<3} {step:<12} {cost.s_per_case:7.2f} s/case "
                        f"{cost.tree_rss_peak / MiB:6.0f} MiB tree RSS  "
                        f"load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
                    if step == "loader-warm":  # the later steps' local disk is their own
                        shutil.rmtree(work / f"cache-{n}")
                        (work / f"cache-{n}").mkdir()
                storage.delete_prefix(f"{BUCKET}/datasets/scale{n}")
                storage.delete_prefix(f"{BUCKET}/scale/{n}")
                shutil.rmtree(work / f"cache-{n}")
                shutil.rmtree(work / f"raw-{n}")
        print()
        _print_table(costs, cores)
        return costs
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
