"""Model server latency at full BraTS size: protocol overhead, concurrency, inference settings.

All in one run, on 127.0.0.1:

A. The wire alone (``benchmarks/echo_server.py``: medseg's server stack with a trivial model
   answering ``3/16`` of the request's bytes as UINT8, the size of a ``[3, X, Y, Z]`` mask set):
   one full-size request of an FP32 ``[1, 4, X, Y, Z]`` tensor, over REST with the binary data
   extension, REST with the same bytes as one NIfTI (BYTES) element, and gRPC
   (``raw_input_contents``), each through :func:`medseg.serving.client.infer`; against a raw
   loopback TCP socket moving the same request and response bytes (a server subprocess that reads
   the request into a buffer and answers zeros). Target: each ≤ 5× the socket. Memory: the server's
   peak RSS during one request (``VmHWM`` reset before it) above its RSS before, against the
   payload (target ≤ 3×).
B. The real predictor (SegResNet from the default config, fixed random weights; inference cost
   does not depend on the weights) on a synthetic full-size case: in-process compute
   (:func:`medseg.inference.infer.segment_case`) against end to end (client send → mask received)
   over REST-binary and gRPC, NIfTI and raw-tensor inputs. Overhead = (end to end − compute) /
   compute (target ≤ 5 %). Then throughput with 1, 2 and 4 concurrent clients.
C. Inference settings: CPU latency of the served default (``InferConfig``: the whole cropped
   volume in one window, ``infer.window``; ``benchmarks/bench_engine.py`` compares it with the
   sliding windows) against MONAI's common default (ROI 128³, overlap 0.5); with
   ``--model`` (a trained model artifact) also their mean Dice on held-out synthetic cases.

Usage: ``python benchmarks/bench_serving.py [--shape 240 240 155] [--repeats 2] [--model DIR]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from _timing import median_time

from medseg.apps.minio_server import free_port
from medseg.apps.model_server_process import ModelServerProcess, write_seeded_model
from medseg.config import MedsegConfig
from medseg.core.storage import Storage
from medseg.data.synth import write_dataset
from medseg.inference.infer import Segmenter, load_model, segment_case
from medseg.serving.client import infer, predict, wait_ready
from medseg.serving.codec import serialize_bytes
from medseg.tasks.networks import build_network

HERE = Path(__file__).resolve().parent
MODALITIES = ("t1", "t1ce", "t2", "flair")


class Server:
    """A server subprocess on free loopback ports, ready when constructed."""

    def __init__(self, cmd: list[str], log: Path):
        self.http, self.grpc = free_port(), free_port()
        cmd = [c.format(http=self.http, grpc=self.grpc) for c in cmd]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.rest = f"http://127.0.0.1:{self.http}"
        wait_ready(self.rest, 600, self.proc, log)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


#: The socket baseline's server (its own process, no imports beyond the standard library): per
#: connection, a 16-byte header (request and response sizes), the request read into one buffer,
#: then that many zero bytes answered.
_SOCKET_SERVER = """
import socket, struct, sys
with socket.create_server(("127.0.0.1", int(sys.argv[1]))) as srv:
    while True:
        conn, _ = srv.accept()
        with conn:
            head = conn.recv(16, socket.MSG_WAITALL)
            if len(head) < 16:
                continue
            size, answer = struct.unpack("<QQ", head)
            view, got = memoryview(bytearray(size)), 0
            while got < size:
                n = conn.recv_into(view[got:])
                if not n:
                    break
                got += n
            conn.sendall(bytes(answer))
"""


def _socket_call(port: int, request: list[bytes | memoryview], answer: int) -> Any:
    import socket
    import struct

    size = sum(len(p) for p in request)

    def call() -> None:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(struct.pack("<QQ", size, answer))
            for part in request:
                conn.sendall(part)
            buf = bytearray(answer)
            view, got = memoryview(buf), 0
            while got < answer:
                n = conn.recv_into(view[got:])
                if not n:
                    raise RuntimeError("socket baseline: short answer")
                got += n

    return call


def _rss(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _peak_over(pid: int, call: Any) -> int:
    """Bytes the process's peak RSS rose above its RSS during ``call()``."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _rss(pid)["VmRSS"]
    call()
    return _rss(pid)["VmHWM"] - before


def part_a(x: np.ndarray, tmp: Path, repeats: int) -> None:
    payload = x.tobytes()
    mib = len(payload) / 2**20
    answer = len(payload) * 3 // 16
    print(
        f"\nA. the wire alone (trivial model): FP32 input {list(x.shape)} = {mib:.0f} MiB, "
        f"UINT8 answer {answer / 2**20:.1f} MiB"
    )
    port = free_port()
    sock = subprocess.Popen([sys.executable, "-c", _SOCKET_SERVER, str(port)])
    try:
        for _ in range(600):
            try:
                _socket_call(port, [b""], 0)()
                break
            except OSError:
                time.sleep(0.1)
        socket_s = median_time(_socket_call(port, [payload], answer), repeats)
    finally:
        sock.terminate()
        sock.wait(30)
    tensor = {"name": "image", "datatype": "FP32", "shape": list(x.shape), "parameters": {}}
    blob = serialize_bytes([payload])  # one NIfTI-sized BYTES element (the echo does not decode)
    nifti = {"name": "nifti", "datatype": "BYTES", "shape": [1], "parameters": {}}
    server = Server(
        [sys.executable, str(HERE / "echo_server.py"), "{http}", "{grpc}"], tmp / "echo.log"
    )
    grpc_url = f"127.0.0.1:{server.grpc}"
    calls = {
        "REST binary, FP32 tensor": lambda: infer(
            server.rest, "echo", tensor, payload, {}, ["mask"], 900
        ),
        "REST binary, NIfTI (BYTES)": lambda: infer(
            server.rest, "echo", nifti, blob, {}, ["mask"], 900
        ),
        "gRPC, FP32 tensor": lambda: infer(
            grpc_url, "echo", tensor, payload, {}, ["mask"], 900, True
        ),
        "gRPC, NIfTI (BYTES)": lambda: infer(
            grpc_url, "echo", nifti, blob, {}, ["mask"], 900, True
        ),
    }
    rows, peaks = {}, {}
    try:
        for name, call in calls.items():
            call()  # warm-up (connections, imports, the server's first allocation)
            peaks[name] = _peak_over(server.proc.pid, call)
            rows[name] = median_time(call, repeats)
    finally:
        server.stop()
    print(f"  {'raw loopback TCP socket':<30} {socket_s:8.3f} s   (1.00x socket)")
    for name, seconds in rows.items():
        print(
            f"  {name:<30} {seconds:8.3f} s   ({seconds / socket_s:5.2f}x socket; target <= 5)   "
            f"server peak RSS +{peaks[name] / 2**20:6.0f} MiB = {peaks[name] / len(payload):4.2f}x "
            f"payload (target <= 3)"
        )


def part_b(case: Path, model_dir: Path, tmp: Path, repeats: int) -> None:
    imgs = [nib.load(next(case.glob(f"*_{m}.nii.gz"))) for m in MODALITIES]
    image = np.stack([i.get_fdata(dtype=np.float32) for i in imgs])  # type: ignore[attr-defined]
    affine = imgs[0].affine  # type: ignore[attr-defined]
    seg = load_model(str(model_dir), Storage())
    segment_case(seg, image, affine)  # warm-up
    compute = median_time(lambda: segment_case(seg, image, affine), repeats)
    print(
        f"\nB. real predictor on a synthetic case {list(image.shape)}; torch threads "
        f"{torch.get_num_threads()}\n  in-process compute            {compute:8.2f} s"
    )
    server = ModelServerProcess(model_dir, tmp / "server.log", max_concurrency=1).start(600)
    try:
        grpc_url = server.grpc
        predict(server.url, [case])  # warm-up
        paths = {
            "REST binary, NIfTI": lambda: predict(server.url, [case]),
            "REST binary, FP32 tensor": lambda: predict(server.url, [case], tensor="FP32"),
            "gRPC, NIfTI": lambda: predict(grpc_url, [case], grpc=True),
            "gRPC, FP32 tensor": lambda: predict(grpc_url, [case], grpc=True, tensor="FP32"),
        }
        results, own = {}, {}
        for name, fn in paths.items():
            answers: list[Any] = []
            results[name] = median_time(lambda fn=fn, out=answers: out.append(fn()), repeats)
            # the same request's own compute (server-side segment_case), so that run-to-run
            # variation of the compute does not count as overhead
            own[name] = statistics.median(a.latency_s - a.compute_ms / 1000 for a in answers)
        for name, seconds in results.items():
            overhead = (seconds - compute) / compute
            print(
                f"  {name:<28} {seconds:8.2f} s   vs in-process {100 * overhead:+6.1f} %;  "
                f"latency - own compute {own[name]:5.2f} s = {100 * own[name] / compute:4.1f} %"
            )
        print(
            f"  REST/gRPC (FP32 tensor)      "
            f"{results['REST binary, FP32 tensor'] / results['gRPC, FP32 tensor']:8.2f}x"
        )
        print("  concurrency (REST, NIfTI; the server segments one case at a time, others queue):")
        for clients in (1, 2, 4):
            t = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                lat = list(
                    pool.map(lambda _: predict(server.url, [case]).latency_s, range(clients))
                )
            wall = time.perf_counter() - t
            print(
                f"    {clients} clients: {clients / wall:.3f} cases/s, latency median "
                f"{statistics.median(lat):.2f} s, max {max(lat):.2f} s"
            )
    finally:
        server.stop()


def part_c(case_dirs: list[Path], model_dir: Path | None, shape_cfg: MedsegConfig) -> None:
    settings = {
        "the model's own InferConfig": {},
        "MONAI default (128^3, overlap 0.5)": {
            "window": "sliding",
            "roi_size": [128, 128, 128],
            "overlap": 0.5,
        },
    }
    print("\nC. inference settings (in-process, CPU)")
    for name, over in settings.items():
        if model_dir is not None:
            base = load_model(str(model_dir), Storage())
            cfg = base.cfg.model_copy(update={"infer": base.cfg.infer.model_copy(update=over)})
            seg = Segmenter(cfg, base.net, base.device)
        else:
            cfg = shape_cfg.model_copy(update={"infer": shape_cfg.infer.model_copy(update=over)})
            torch.manual_seed(0)
            seg = Segmenter(cfg, build_network(cfg.model).eval(), torch.device("cpu"))
        times, dices = [], []
        for case in case_dirs:
            imgs = [nib.load(next(case.glob(f"*_{m}.nii.gz"))) for m in MODALITIES]
            image = np.stack([i.get_fdata(dtype=np.float32) for i in imgs])  # type: ignore[attr-defined]
            t = time.perf_counter()
            out = segment_case(seg, image, imgs[0].affine)  # type: ignore[attr-defined]
            times.append(time.perf_counter() - t)
            if model_dir is not None:
                from medseg.evaluation.evaluate import score_case
                from medseg.tasks.labels import get_convention

                truth_img = nib.load(next(case.glob("*_seg.nii.gz")))
                truth = get_convention("brats2021").to_regions(
                    np.asarray(truth_img.dataobj).astype(np.int64)  # type: ignore[attr-defined]
                )
                spacing = tuple(float(z) for z in truth_img.header.get_zooms()[:3])
                scores = score_case(
                    case.name, torch.as_tensor(out.regions), torch.as_tensor(truth), spacing
                )
                dices.extend(scores.dice.values())
        dice = f", mean Dice {np.mean(dices):.4f}" if dices else ""
        i = cfg.infer
        label = f"{name} ({i.window}, ROI {list(i.roi_size)}, overlap {i.overlap})"
        print(f"  {label:<62} {statistics.median(times):7.2f} s/case{dice}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", type=Path, help="A trained model artifact folder (for C).")
    parser.add_argument("--cases", type=int, default=2, help="Held-out synthetic cases for C.")
    parser.add_argument("--skip", default="", help="Parts to skip, e.g. 'A' or 'AC'.")
    args = parser.parse_args()
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        write_dataset(tmp / "data", "brats2021", n_cases=args.cases, shape=shape, seed=1234)
        cases = sorted(p for p in (tmp / "data").iterdir() if p.is_dir())
        cfg = MedsegConfig()
        model_dir = args.model
        if model_dir is None:
            model_dir = write_seeded_model(tmp / "model", cfg)
        if "A" not in args.skip:
            x = np.random.default_rng(0).random((1, 4, *shape), dtype=np.float32)
            part_a(x, tmp, args.repeats)
        if "B" not in args.skip:
            part_b(cases[0], model_dir, tmp, args.repeats)
        if "C" not in args.skip:
            part_c(cases, args.model, cfg)
    print("\ncommand: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
