"""SIGTERM drains the real model server: in-flight cases finish, new ones are refused, it exits.

Kubernetes sends SIGTERM when it removes a predictor pod (a scale-down, a rollout, a node
drain) and kills the process ``terminationGracePeriodSeconds`` later. A case that is being
segmented then must still be answered, over REST and gRPC alike.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from medseg.core.settings import ServerLimits
from medseg.serving.kserve_import import clean_argv
from tests.conftest import model_server, write_tiny_model
from tests.unit.model_server.test_hostile import ENV, HEADER, _slow_body

#: The grace period the test's server is given (``MEDSEG_SERVER_GRACE_PERIOD_S``): far longer
#: than the two slow cases take even on a loaded machine (one took 112 s at load 3 on 2 cores
#: with overlap 0.875), so that only a server that does not drain misses it.
GRACE_S = 300
LIMITS = ServerLimits(grace_period_s=GRACE_S)


def _pb() -> tuple[Any, Any]:
    with clean_argv():
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
    return pb, pb_grpc


def _grpc_infer(address: str, seed: int) -> Any:
    """A 4×64³ FP32 case of noise over gRPC (seconds of sliding windows), its answer."""
    import grpc

    pb, pb_grpc = _pb()
    x = np.random.default_rng(seed).random((1, 4, 64, 64, 64), dtype=np.float32)
    request = pb.ModelInferRequest(
        model_name="medseg",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=x.shape)
        ],
        raw_input_contents=[x.tobytes()],
    )
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=GRACE_S)


def _rest_refuses(port: int) -> bool:
    """Whether a new REST connection is refused, or answered 503."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = s.recv(4096)
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    return answer.startswith(b"HTTP/1.1 503 ") or answer == b""


def _grpc_refuses(address: str) -> bool:
    """Whether a new gRPC channel's call is refused (UNAVAILABLE)."""
    import grpc

    pb, pb_grpc = _pb()
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(
                pb.ServerReadyRequest(), timeout=5
            )
        except grpc.RpcError as err:
            return bool(err.code() == grpc.StatusCode.UNAVAILABLE)
    return False


def _inflight(rest: str) -> float:
    for line in httpx.get(f"{rest}/metrics", timeout=10).text.splitlines():
        if line.startswith("medseg_inflight_requests "):
            return float(line.split()[1])
    return 0.0


def _until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {seconds:.0f} s"
        time.sleep(0.1)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """The tiny SegResNet in 125 sliding windows: a 64³ case takes seconds on a CPU."""
    return write_tiny_model(tmp_path / "m", seed=1, infer={"window": "sliding", "overlap": 0.75})


def test_sigterm_finishes_inflight_cases_refuses_new_ones_and_exits(
    model_dir: Path, tmp_path: Path
) -> None:
    env = {"OMP_NUM_THREADS": "2", **ENV, "MEDSEG_SERVER_GRACE_PERIOD_S": str(GRACE_S)}
    with (
        model_server(model_dir, tmp_path / "server.log", env) as server,
        ThreadPoolExecutor(2) as pool,
    ):
        body, headers = _slow_body(0)
        url = f"{server.url}/v2/models/medseg/infer"
        rest: Future[httpx.Response] = pool.submit(
            httpx.post, url, content=body, headers=headers, timeout=GRACE_S
        )
        _until(lambda: _inflight(server.url) >= 1, 60, "computing the REST case")
        grpc_call = pool.submit(_grpc_infer, server.grpc, 1)  # waits for the slot
        _until(lambda: _inflight(server.url) >= 2, 60, "holding the gRPC case")

        server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _until(lambda: _rest_refuses(server.ports[0]), 30, "refusing new REST connections")
        _until(lambda: _grpc_refuses(server.grpc), 30, "refusing new gRPC calls")
        assert not rest.done() and not grpc_call.done(), "the cases ended before the check"

        answer = rest.result()
        assert answer.status_code == 200, answer.text
        head = orjson.loads(answer.content[: int(answer.headers[HEADER])])
        assert {o["name"] for o in head["outputs"]} >= {"volumes_ml", "mask"}
        reply = grpc_call.result()
        assert {o.name for o in reply.outputs} >= {"volumes_ml", "mask"}
        code = server.wait(LIMITS.grace_period_s - (time.monotonic() - signalled))
        assert code == 0, server.log_path.read_text()[-3000:]
