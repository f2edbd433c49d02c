"""The model server under the attacks of issue 12, with its default limits (BraTS-sized).

Prints, for each attack: the answer, the time to refuse it, and the growth of the server's peak
RSS (VmHWM, reset with ``/proc/PID/clear_refs`` just before) over its RSS just before; then the
same for the largest legitimate request (a full BraTS FP32 tensor, 240×240×155×4), and the ratio
of each attack's growth to that working set (target: at most 2×). Last, three full-size requests
whose clients leave after 2 s, and how long a small request then waits for its answer.

    .venv/bin/python benchmarks/bench_hostile.py
"""

from __future__ import annotations

import gzip
import socket
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import orjson

from medseg.apps.model_server_process import ModelServerProcess, write_seeded_model
from medseg.config import MedsegConfig
from medseg.core.settings import ServerLimits
from medseg.data.synth import write_dataset
from medseg.serving.client import predict
from medseg.serving.codec import serialize_bytes

HEADER = "inference-header-content-length"
#: A slow client is cut after 3 s without a byte (default 30 s), so that the attack ends soon.
ENV = {"MEDSEG_SERVER_BODY_IDLE_S": "3"}
#: Seconds to wait before reading what stays resident after an attack (the server hands the
#: memory of a large request back InflightBudget.RELEASE_DELAY_S after it).
SETTLE_S = 2.0
#: How the server's refusal log (one JSON object a line) writes a cancelled request.
CANCELLED = '"status":499'


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"no {key}")


def _reset_peak(pid: int) -> int:
    """Reset the process's VmHWM to its current RSS (Linux ``clear_refs`` 5); that RSS, MiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status(pid, "VmRSS")


def _hwm(pid: int) -> int:
    return _status(pid, "VmHWM")


def _claiming(shape: tuple[int, ...], dtype: Any = np.uint8) -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_data_offset(352)
    return hdr.binaryblock + b"\0" * 4


def _nifti_body(blob: bytes) -> tuple[bytes, dict[str, str]]:
    raw = serialize_bytes([blob])
    spec = {"name": "nifti", "datatype": "BYTES", "shape": [1]}
    spec["parameters"] = {"binary_data_size": len(raw)}
    head = orjson.dumps({"inputs": [spec]})
    return head + raw, {HEADER: str(len(head))}


def _tensor_body(x: np.ndarray, **params: Any) -> tuple[bytes, dict[str, str]]:
    spec = {"name": "image", "datatype": "FP32", "shape": list(x.shape)}
    spec["parameters"] = {"binary_data_size": x.nbytes, **params}
    head = orjson.dumps({"inputs": [spec]})
    return head + x.tobytes(), {HEADER: str(len(head))}


def _bomb() -> bytes:
    """A valid gzipped 512³×4 uint8 NIfTI of zeros (about 0.5 MB)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = packer.compress(_claiming((512, 512, 512, 4)))
    for _ in range(32):
        out += packer.compress(b"\0" * (16 << 20))
    return out + packer.flush()


def _rss(pid: int) -> int:
    return _status(pid, "VmRSS")


def _busy(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith('medseg_request_errors_total{class="busy"}'):
            return float(line.split()[-1])
    return 0.0


def _grpc_parameter_attack(pid: int, target: str) -> tuple[str, str, float, int, int]:
    """One ModelInfer whose request parameter is a 200 MB string."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(
        model_name="medseg",
        parameters={"note": pb.InferParameter(string_param="x" * 200_000_000)},
        inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[1])],
        raw_input_contents=[b"\0" * 4],
    )
    options = [("grpc.max_send_message_length", 256 << 20)]
    base = _reset_peak(pid)
    started = time.perf_counter()
    with grpc.insecure_channel(target, options=options) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=300)
            answer = "OK"
        except grpc.RpcError as err:
            answer = f"{err.code().name} {(err.details() or '')[:60]}"
    took = time.perf_counter() - started
    time.sleep(SETTLE_S)
    return ("gRPC parameter of 200 MB", answer, took, _hwm(pid) - base, _rss(pid) - base)


def _overload_attack(
    pid: int, url: str, port: int, limits: ServerLimits
) -> tuple[str, str, float, int, int]:
    """The in-flight budget held full; 40 clients upload 32 MiB each at once."""
    from concurrent.futures import ThreadPoolExecutor

    busy_before = _busy(url)
    base = _reset_peak(pid)
    holders = []
    for _ in range(limits.max_inflight_mb // limits.max_request_mb):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(
            b"POST /v2/models/medseg/infer HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {limits.max_request_bytes}\r\n\r\n{{".encode()
        )
        holders.append(s)
    stop = threading.Event()

    def trickle() -> None:  # a byte a second: the holders stay within body_idle_s
        while not stop.wait(1):
            for s in holders:
                s.sendall(b" ")

    threading.Thread(target=trickle, daemon=True).start()
    time.sleep(0.5)
    body = b"\0" * (32 << 20)

    def client(_: int) -> str:
        try:
            r = httpx.post(f"{url}/v2/models/medseg/infer", content=body, timeout=120)
        except httpx.TransportError as exc:
            return type(exc).__name__
        return f"{r.status_code}{'+Retry-After' if 'retry-after' in r.headers else ''}"

    started = time.perf_counter()
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(client, range(40)))
    took = time.perf_counter() - started
    stop.set()
    for s in holders:
        s.close()
    time.sleep(1)
    counted = _busy(url) - busy_before
    summary = ", ".join(f"{answers.count(a)}× {a}" for a in sorted(set(answers)))
    summary += f"; busy counted {counted:.0f}"
    return ("40 × 32 MiB, in-flight budget full", summary, took, _hwm(pid) - base, _rss(pid) - base)


def main() -> None:
    """Start a server, attack it, print the figures."""
    work = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    cfg = MedsegConfig.model_validate(
        {
            "model": {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]},
            "infer": {"roi_size": [32, 32, 32]},
        }
    )
    model = write_seeded_model(work / "model", cfg)
    write_dataset(work / "synth", "brats2021", n_cases=1, shape=(48, 48, 32), seed=7)
    case = next(p for p in (work / "synth").iterdir() if p.is_dir())
    server = ModelServerProcess(model, work / "server.log", env=ENV)
    url, (http, grpc) = server.url, server.ports
    limits = ServerLimits(**{k.removeprefix("MEDSEG_SERVER_").lower(): v for k, v in ENV.items()})
    server.start(timeout=900)
    assert server.pid is not None
    pid = server.pid
    try:
        started = time.perf_counter()
        predict(url, [case])
        small_s = time.perf_counter() - started
        idle = _reset_peak(pid)
        print(f"server after one small case: RSS {idle} MiB; limits: {limits}")
        rows: list[tuple[str, str, float, int, int]] = []

        def attack(name: str, body: bytes, headers: dict[str, str]) -> None:
            base = _reset_peak(pid)
            started = time.perf_counter()
            r = httpx.post(
                f"{url}/v2/models/medseg/infer", content=body, headers=headers, timeout=900
            )
            took = time.perf_counter() - started
            answer = f"{r.status_code} ({len(r.content)} B) {r.text[:60]}"
            time.sleep(SETTLE_S)
            rows.append((name, answer, took, _hwm(pid) - base, _rss(pid) - base))

        attack("gzipped 512³×4 uint8 NIfTI", *_nifti_body(_bomb()))
        attack("header claims 2000³×4", *_nifti_body(gzip.compress(_claiming((2000,) * 3 + (4,)))))
        attack("header claims 30000³", *_nifti_body(_claiming((30000,) * 3)))
        attack("RGB24 NIfTI", *_nifti_body(_claiming((8, 8, 8, 4), "RGB") + b"\0" * 6144))
        tiny = np.zeros((1, 4, 16, 16, 16), np.float32)
        attack("spacing 32 on a 16³ tensor", *_tensor_body(tiny, spacing="32,32,32"))
        attack("spacing 1e308", *_tensor_body(tiny, spacing="1e308,1,1"))
        attack("label_convention as a list", *_tensor_body(tiny, label_convention=["msd"]))
        zeros = b'{"inputs":[{"name":"image","datatype":"FP32","shape":[1],"data":['
        zeros += b"0," * 60_000_000 + b"0]}]}"
        attack("JSON of 60 M zeros (120 MB)", zeros, {})
        head = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [0]}]}
        attack("an id of 200 MB", orjson.dumps({**head, "id": "x" * 200_000_000}), {})
        rows.append(_grpc_parameter_attack(pid, f"127.0.0.1:{grpc}"))
        rows.append(_overload_attack(pid, url, http, limits))

        # 16 connections declare 256 MiB and send one byte
        base = _reset_peak(pid)
        started = time.perf_counter()
        socks = []
        for _ in range(16):
            s = socket.create_connection(("127.0.0.1", http), timeout=60)
            s.sendall(
                b"POST /v2/models/medseg/infer HTTP/1.1\r\nHost: x\r\n"
                + f"Content-Length: {limits.max_request_bytes}\r\n\r\n{{".encode()
            )
            socks.append(s)
        statuses = []
        for s in socks:
            statuses.append(s.recv(4096).decode(errors="replace").split(" ", 2)[1])
            s.close()
        took = time.perf_counter() - started
        summary = ", ".join(f"{statuses.count(c)}× {c}" for c in sorted(set(statuses)))
        rows.append(
            (
                "16 × Content-Length 256 MiB, 1 byte",
                summary,
                took,
                _hwm(pid) - base,
                _rss(pid) - base,
            )
        )

        # the largest legitimate request: one BraTS case as FP32
        x = np.random.default_rng(0).random((1, 4, 240, 240, 155), dtype=np.float32)
        body, headers = _tensor_body(x)
        base = _reset_peak(pid)
        started = time.perf_counter()
        r = httpx.post(f"{url}/v2/models/medseg/infer", content=body, headers=headers, timeout=1800)
        legit_s = time.perf_counter() - started
        legit = _hwm(pid) - base
        print(
            f"largest legitimate request (240×240×155×4 FP32, {x.nbytes >> 20} MiB): "
            f"{r.status_code} in {legit_s:.1f} s, peak RSS growth {legit} MiB"
        )
        print(
            f"{'attack':38} {'answer':76} {'refused in':>10} {'peak growth':>11} {'/ legit':>7} "
            f"{'resident after':>14}"
        )
        for name, answer, took, growth, after in rows:
            print(
                f"{name:38} {answer:76} {took * 1000:8.0f} ms {growth:7d} MiB "
                f"{growth / max(legit, 1):7.2f} {after:10d} MiB"
            )

        # three full-size requests whose clients leave after 2 s; then a tiny request
        socks = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", http), timeout=60)
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            try:
                s.sendall(
                    f"POST /v2/models/medseg/infer HTTP/1.1\r\nHost: x\r\n{head}"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                )
                s.sendall(body)
            except OSError as exc:  # refused before the whole body was sent
                print(f"a full-size request was refused while sending: {exc}")
            socks.append(s)
        time.sleep(2)
        for s in socks:
            s.close()
        started = time.perf_counter()
        predict(url, [case])
        print(
            f"3 full-size requests abandoned after 2 s: a small case then answered in "
            f"{time.perf_counter() - started:.1f} s (alone, at the start: {small_s:.1f} s); "
            f"log: {server.log_path.read_text().count(CANCELLED)} requests cancelled"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
