"""The model server under hostile and careless clients (issue 12): each attack is refused with a
4xx naming the limit, the server stays under a memory bound, and still answers a good request.

One server for the module, on loopback, with small limits so that the attacks are cheap: its
model is saved with a non-default channel order (issue 11 item 1).
"""

from __future__ import annotations

import gzip
import json
import socket
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.config import REGIONS
from medseg.core.errors import InputError
from medseg.core.settings import ServerLimits
from medseg.core.storage import Storage
from medseg.inference.infer import load_model, segment_case
from medseg.serving.client import predict
from medseg.serving.codec import decode_nifti, serialize_bytes, validate_params
from medseg.serving.kserve_import import clean_argv
from tests.conftest import model_server, write_tiny_model

HEADER = "inference-header-content-length"
#: The model's own channel order: not the canonical t1, t1gd, t2, flair.
MODEL_CHANNELS = ("flair", "t1", "t1gd", "t2")
#: Small limits, so that each attack is cheap to send (the defaults are BraTS-sized).
ENV = {
    "MEDSEG_SERVER_MAX_REQUEST_MB": "8",
    "MEDSEG_SERVER_MAX_INFLIGHT_MB": "16",
    "MEDSEG_SERVER_MAX_CASE_VOXELS": str(4 * 64**3),
    "MEDSEG_SERVER_MAX_RESAMPLED_VOXELS": str(4 * 64**3),
    "MEDSEG_SERVER_BODY_TIMEOUT_S": "4",
    "MEDSEG_SERVER_BODY_IDLE_S": "2",
}
LIMITS = ServerLimits(**{k.removeprefix("MEDSEG_SERVER_").lower(): v for k, v in ENV.items()})
#: How far above a good request's peak RSS an attack may take the server's: the largest
#: legitimate request (4×64³ FP32 voxels, 4 MiB, decoded, resampled and segmented) needs well
#: under this more than the test case does.
RSS_BOUND_MB = 200


def _nifti(data: np.ndarray, affine: np.ndarray | None = None, gz: bool = True) -> bytes:
    raw = nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_bytes()
    return gzip.compress(raw, compresslevel=1) if gz else raw


def _claiming(shape: tuple[int, ...], dtype: Any = np.uint8, body: bytes = b"") -> bytes:
    """A NIfTI header announcing ``shape`` voxels, followed by ``body`` only."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_data_offset(352)
    return hdr.binaryblock + b"\0" * 4 + body


def _rss(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) // 1024
    return fields


def _refusals(logged: str, status: int, where: str | None = None, reason: str = "") -> int:
    """The refusals logged (one JSON object a line) with this status, place and reason prefix."""
    count = 0
    for line in logged.splitlines():
        start = line.find('{"event":"refused"')
        if start < 0:
            continue
        entry = json.loads(line[start:])
        if entry["status"] == status and where in (None, entry["where"]):
            count += entry["reason"].startswith(reason)
    return count


#: 127.0.0.1, ::ffff:127.0.0.1 (gRPC's IPv6 socket for it) and ::1, as /proc/net/tcp* write them.
_LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net lists them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            addr, _, hexport = parts[1].partition(":")
            if parts[3] == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SegResNet whose ``model.yaml`` has ``data.channels`` in a non-default order."""
    return write_tiny_model(
        tmp_path_factory.mktemp("model") / "m",
        seed=1,
        data={"channels": list(MODEL_CHANNELS)},
        # many windows: a 64³ case takes seconds on a CPU, so that clients can leave it
        infer={"window": "sliding", "overlap": 0.875},
    )


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``python -m model_server`` with the small limits, on free loopback ports."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {"OMP_NUM_THREADS": "2", **ENV}
    with model_server(model_dir, log, env, ready_timeout=600) as running:
        yield {
            "rest": running.url,
            "grpc": running.grpc,
            "pid": running.pid,
            "log": running.log_path,
            "ports": running.ports,
        }


@pytest.fixture(scope="module")
def case(synth_root: Path) -> Path:
    return sorted(p for p in (synth_root / "brats2021").iterdir() if p.is_dir())[0]


@pytest.fixture(scope="module")
def baseline(server: dict[str, Any], case: Path) -> int:
    """The server's peak RSS (MiB) while it answers good requests over REST and gRPC.

    Writing 5 to ``/proc/PID/clear_refs`` resets VmHWM to the current RSS. It is reset after a
    first pair of good requests (so the server's start, importing torch, is not counted), the
    peak of a second pair is read, and it is reset again: the peak measured afterwards is the
    attacks' (and the good request each check sends), compared with a good request's own.

    The RSS left after good requests is not a baseline: it varied by 144 MiB between runs (939
    against 1,083 MiB; the allocator keeps or returns freed memory), while a good request's peak
    stayed at ~1,160 MiB, so "peak minus RSS" once read +222 MiB with no attack to blame.
    """
    for _ in range(2):
        Path(f"/proc/{server['pid']}/clear_refs").write_text("5")
        predict(server["rest"], [case])
        predict(server["grpc"], [case], grpc=True)
    good = _rss(server["pid"])["VmHWM"]
    Path(f"/proc/{server['pid']}/clear_refs").write_text("5")
    return good


def _still_fine(server: dict[str, Any], case: Path, baseline: int) -> None:
    """A good request is still answered, and the peak RSS stays within the bound of a good one."""
    assert predict(server["rest"], [case]).volumes_ml.keys() == set(REGIONS)
    peak = _rss(server["pid"])["VmHWM"]
    assert peak - baseline < RSS_BOUND_MB, f"peak RSS {peak} MiB; a good request's {baseline} MiB"


def _infer(server: dict[str, Any], body: bytes, headers: dict[str, str] | None = None) -> Any:
    return httpx.post(
        f"{server['rest']}/v2/models/medseg/infer", content=body, headers=headers, timeout=60
    )


def _nifti_request(blobs: list[bytes], **params: Any) -> tuple[bytes, dict[str, str]]:
    raw = serialize_bytes(blobs)
    spec = {
        "name": "nifti",
        "datatype": "BYTES",
        "shape": [len(blobs)],
        "parameters": {"binary_data_size": len(raw)},
    }
    head = orjson.dumps({"inputs": [spec], "parameters": params})
    return head + raw, {HEADER: str(len(head))}


def _tensor_doc(shape: list[int], **params: Any) -> dict[str, Any]:
    data = np.zeros(int(np.prod(shape)), np.float32).tolist()
    return {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": shape, "data": data}],
        "parameters": params,
    }


# ---------------------------------------------------------------- the codec, in process


def test_nifti_header_is_checked_before_any_voxel_is_read() -> None:
    """A header announcing 2000³×4 voxels costs no memory: refused from its 352 bytes."""
    for shape in ((2000, 2000, 2000, 4), (30000, 30000, 30000), (512, 512, 512, 4)):
        data = gzip.compress(_claiming(shape, body=b"\0" * 1000))
        tracemalloc.start()
        with pytest.raises(InputError, match="max_case_voxels=41943040"):
            decode_nifti(data, "file", ServerLimits())
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1_000_000, peak


def test_gzip_bomb_inflates_no_further_than_the_header_announces() -> None:
    """A valid 32³ image followed by 256 MiB of zeros: only the announced bytes are inflated."""
    small = _nifti(np.ones((32, 32, 32), np.uint8), gz=False)
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = packer.compress(small)
    zeros = b"\0" * (16 << 20)
    for _ in range(16):
        bomb += packer.compress(zeros)
    bomb += packer.flush()
    assert len(bomb) < 1_000_000
    tracemalloc.start()
    vol = decode_nifti(bomb, "file", ServerLimits())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert vol.data.shape == (32, 32, 32) and vol.data.sum() == 32**3
    assert peak < 2_000_000, peak  # 32 KiB of voxels + float32 copy, not 256 MiB


def test_decoded_voxels_match_nibabel() -> None:
    """The bounded reader gives nibabel's values, scaling included."""
    rng = np.random.default_rng(0)
    data = rng.integers(-300, 3000, (9, 8, 7), dtype=np.int16)
    img = nib.Nifti1Image(data, np.diag([0.9, 1.1, 2.0, 1.0]))
    img.header.set_slope_inter(0.25, 10.0)
    blob = gzip.compress(img.to_bytes())
    vol = decode_nifti(blob, "file", ServerLimits())
    again = nib.Nifti1Image.from_bytes(gzip.decompress(blob))
    np.testing.assert_array_equal(vol.data, again.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(vol.affine, again.affine)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (_claiming((4, 4, 4), "RGB", b"\0" * 192), "not a scalar integer or float type"),
        (_claiming((64, 64, 64), np.float32, b"\0" * 100), "truncated"),
        (b"\x1f\x8b" + b"garbage" * 60, "corrupt gzip"),
        (b"\0" * 400, "neither"),
    ],
    ids=["RGB24", "truncated", "bad gzip", "not NIfTI"],
)
def test_bad_nifti_is_an_input_error(blob: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message):
        decode_nifti(blob, "file", ServerLimits())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"label_convention": ["msd"]}, "label_convention"),
        ({"channels": [1, 2, 3, 4]}, "channels"),
        ({"spacing": 100}, "spacing"),
        ({"spacing": [1e308, 1, 1]}, None),
        ({"spacing": "nan,1,1"}, "spacing"),
        ({"affine": "1,2,3"}, "affine"),
        ({"probabilities": "maybe"}, "probabilities"),
    ],
)
def test_parameters_are_validated_by_one_function(
    params: dict[str, Any], message: str | None
) -> None:
    if message is None:  # a type-correct but out-of-range spacing: caught with the limits
        with pytest.raises(InputError, match="max_spacing_mm"):
            validate_params(params).geometry(ServerLimits())
        return
    with pytest.raises(InputError, match=message):
        validate_params(params)


def test_false_as_a_string_is_false() -> None:
    assert validate_params({"binary_data_output": "false"}).binary_data_output is False
    assert validate_params({"binary_data_output": "true"}).binary_data_output is True


# ---------------------------------------------------------------- the server


def test_server_binds_loopback_only(server: dict[str, Any]) -> None:
    """REST and gRPC listen on 127.0.0.1, not on all interfaces (kserve's default)."""
    for port in server["ports"]:
        found = _listening(port)
        assert found and found <= _LOOPBACK, (port, found)


def test_model_channel_order_is_the_servers_default(
    server: dict[str, Any], case: Path, model_dir: Path
) -> None:
    """The model was trained on (flair, t1, t1gd, t2): the server feeds it in that order."""
    files = [next(case.glob(f"*_{m}.nii.gz")) for m in ("t1", "t1ce", "t2", "flair")]
    canonical = np.stack([nib.load(f).get_fdata(dtype=np.float32) for f in files])  # type: ignore[attr-defined]
    affine = nib.load(files[0]).affine  # type: ignore[attr-defined]
    seg = load_model(str(model_dir), Storage())
    order = [("t1", "t1gd", "t2", "flair").index(c) for c in MODEL_CHANNELS]
    expected = segment_case(seg, canonical[order], affine).volumes_ml
    # the client names its channels (canonical here): the server reorders them to the model's
    for url, grpc in ((server["rest"], False), (server["grpc"], True)):
        got = predict(url, [case], grpc=grpc)
        assert got.volumes_ml == pytest.approx(expected, rel=1e-5)
        got = predict(url, [case], grpc=grpc, tensor="FP32")
        assert got.volumes_ml == pytest.approx(expected, rel=1e-5)
    # without a channel list, a tensor is taken to be in the model's own order
    x = canonical[order][None]
    body = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {
                        "binary_data_size": x.nbytes,
                        "affine": ",".join(map(str, affine.ravel())),
                    },
                }
            ]
        }
    )
    r = _infer(server, body + x.tobytes(), {HEADER: str(len(body))})
    assert r.status_code == 200, r.text
    head = orjson.loads(r.content[: int(r.headers[HEADER])])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    vols = np.frombuffer(r.content[int(r.headers[HEADER]) + sizes[0] :][:12], np.float32)
    assert vols.tolist() == pytest.approx([expected[k] for k in REGIONS], rel=1e-5)


def _bad(case: Path) -> dict[str, tuple[bytes, dict[str, str], str]]:
    flair = next(case.glob("*_flair.nii.gz")).read_bytes()
    zeros = zlib.compressobj(9, zlib.DEFLATED, 31)
    big = zeros.compress(_claiming((512, 512, 512, 4)))  # a valid 0.5 MB gzipped 512³×4 uint8
    for _ in range(32):
        big += zeros.compress(b"\0" * (16 << 20))
    big += zeros.flush()

    def doc(d: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        return orjson.dumps(d), {}

    return {
        "RGB24 NIfTI": (
            *_nifti_request([_claiming((8, 8, 8, 4), "RGB", b"\0" * 6144)]),
            "not a scalar",
        ),
        "header claims 2000³×4": (
            *_nifti_request([gzip.compress(_claiming((2000, 2000, 2000, 4), body=b"\0" * 64))]),
            "max_case_voxels",
        ),
        "header claims 30000³": (
            *_nifti_request([_claiming((30000, 30000, 30000))]),
            "max_case_voxels",
        ),
        "gzipped 512³×4 uint8": (*_nifti_request([big]), "max_case_voxels"),
        "spacing 32 on 16³": (
            *doc(_tensor_doc([1, 4, 16, 16, 16], spacing="32,32,32")),
            "max_resampled_voxels",
        ),
        "JSON shape wraps int64": (
            *doc(
                {
                    "inputs": [
                        {
                            "name": "image",
                            "datatype": "FP32",
                            "shape": [2**32, 2**32, 2**32, 4],
                            "data": [1.0],
                        }
                    ]
                }
            ),
            "max_case_voxels",
        ),
        "label_convention as a list": (
            *doc(_tensor_doc([1, 4, 8, 8, 8], label_convention=["msd"])),
            "label_convention",
        ),
        "channels as numbers": (
            *doc(_tensor_doc([1, 4, 8, 8, 8], channels=[1, 2, 3, 4])),
            "channels",
        ),
        "spacing 100": (*doc(_tensor_doc([1, 4, 8, 8, 8], spacing=100)), "spacing"),
        "spacing 1e308": (
            *doc(_tensor_doc([1, 4, 8, 8, 8], spacing=[1e308, 1, 1])),
            "max_spacing_mm",
        ),
        "channels one short": (*_nifti_request([flair], channels="t1,t2,flair"), "channels"),
        "JSON of a million zeros": (
            b'{"inputs":[{"name":"image","datatype":"FP32","shape":[1],"data":['
            + b"0," * 3_000_000
            + b"0]}]}",
            {},
            "max_json_values",
        ),
    }


BAD = [
    "RGB24 NIfTI",
    "header claims 2000³×4",
    "header claims 30000³",
    "gzipped 512³×4 uint8",
    "spacing 32 on 16³",
    "JSON shape wraps int64",
    "label_convention as a list",
    "channels as numbers",
    "spacing 100",
    "spacing 1e308",
    "channels one short",
    "JSON of a million zeros",
]


def test_each_bad_request_is_a_400_with_one_log_line(
    server: dict[str, Any], case: Path, baseline: int
) -> None:
    bad = _bad(case)
    assert sorted(bad) == sorted(BAD)
    before = server["log"].read_text()
    for name in BAD:
        body, headers, message = bad[name]
        r = _infer(server, body, headers)
        assert r.status_code == 400, (name, r.text)
        assert message in r.json()["error"], (name, r.text)
    logged = server["log"].read_text()[len(before) :]
    assert _refusals(logged, 400, "POST /v2/models/medseg/infer") == len(BAD)
    assert "Traceback" not in logged
    _still_fine(server, case, baseline)


def test_binary_data_output_false_means_json(server: dict[str, Any], case: Path) -> None:
    body = orjson.dumps(_tensor_doc([1, 4, 8, 8, 8], binary_data_output="false"))
    r = _infer(server, body)
    assert r.status_code == 200, r.text
    assert HEADER not in r.headers
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert len(out["volumes_ml"]["data"]) == 3


def _grpc_call(server: dict[str, Any], request: Any, timeout: float = 60) -> Any:
    import grpc

    with clean_argv():
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(server["grpc"], options=options) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout)


def _pb() -> Any:
    with clean_argv():
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    return pb


def test_bad_grpc_requests_are_invalid_argument(
    server: dict[str, Any], case: Path, baseline: int
) -> None:
    import grpc

    pb = _pb()
    tensor = pb.ModelInferRequest.InferInputTensor
    flair = next(case.glob("*_flair.nii.gz")).read_bytes()
    bad = {
        "bad BYTES framing": pb.ModelInferRequest(
            model_name="medseg",
            inputs=[tensor(name="nifti", datatype="BYTES", shape=[1])],
            raw_input_contents=[b"\xff\xff\xff\x7f" + flair[:100]],
        ),
        "negative shape": pb.ModelInferRequest(
            model_name="medseg",
            inputs=[tensor(name="image", datatype="FP32", shape=[1, 4, -8, -8, 8])],
            raw_input_contents=[b"\0" * 4 * 4 * 64 * 8],
        ),
        "data shorter than shape": pb.ModelInferRequest(
            model_name="medseg",
            inputs=[tensor(name="image", datatype="FP32", shape=[1, 4, 8, 8, 8])],
            raw_input_contents=[b"\0" * 100],
        ),
        "label_convention as a number": pb.ModelInferRequest(
            model_name="medseg",
            inputs=[tensor(name="nifti", datatype="BYTES", shape=[1])],
            raw_input_contents=[serialize_bytes([flair])],
            parameters={"label_convention": pb.InferParameter(int64_param=3)},
        ),
        "spacing 1e308": pb.ModelInferRequest(
            model_name="medseg",
            inputs=[
                tensor(
                    name="image",
                    datatype="FP32",
                    shape=[1, 4, 8, 8, 8],
                    parameters={"spacing": pb.InferParameter(string_param="1e308,1,1")},
                )
            ],
            raw_input_contents=[b"\0" * 4 * 4 * 512],
        ),
    }
    before = server["log"].read_text()
    for name, request in bad.items():
        with pytest.raises(grpc.RpcError) as err:
            _grpc_call(server, request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
    logged = server["log"].read_text()[len(before) :]
    assert "Traceback" not in logged and _refusals(logged, 400) == len(bad)
    _still_fine(server, case, baseline)


def test_declared_lengths_are_not_allocated_and_slow_bodies_time_out(
    server: dict[str, Any], case: Path, baseline: int
) -> None:
    """16 connections declare the full request size and send one byte (issue 12's attack)."""
    port = server["ports"][0]
    declared = LIMITS.max_request_bytes
    socks = []
    for _ in range(16):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(
            f"POST /v2/models/medseg/infer HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {declared}\r\ncontent-type: application/json\r\n\r\n{{".encode()
        )
        socks.append(s)
    answers = []
    for s in socks:
        answers.append(s.recv(4096).decode(errors="replace"))
        s.close()
    statuses = [a.split(" ", 2)[1] for a in answers]
    fits = LIMITS.max_inflight_bytes // declared  # bodies the in-flight budget admits
    assert statuses.count("503") == 16 - fits, statuses
    assert statuses.count("408") == fits, statuses  # they never finished: body timeout
    assert all("retry-after: 5" in a.lower() for a in answers if " 503 " in a)
    # a declared length over the limit is refused before any byte is read
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            f"POST /v2/models/medseg/infer HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {declared + 1}\r\n\r\n{{".encode()
        )
        chunks = []  # the server closes the connection: read the whole answer, head and body
        while chunk := s.recv(4096):
            chunks.append(chunk)
        answer = b"".join(chunks).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413 ") and "max_request_mb=8" in answer, answer
    _still_fine(server, case, baseline)


def _slow_body(seed: int) -> tuple[bytes, dict[str, str]]:
    """A 4×64³ FP32 case of noise: many sliding windows, seconds of compute on a CPU."""
    x = np.random.default_rng(seed).random((1, 4, 64, 64, 64), dtype=np.float32)
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    )
    return head + x.tobytes(), {HEADER: str(len(head)), "content-type": "application/octet-stream"}


def test_abandoned_requests_are_cancelled(
    server: dict[str, Any], case: Path, baseline: int
) -> None:
    """Clients that leave, computing or queued, stop their work; the next client is served."""
    before = len(server["log"].read_text())
    socks = []
    for seed in range(3):  # one computes, two queue behind it
        body, headers = _slow_body(seed)
        s = socket.create_connection(("127.0.0.1", server["ports"][0]), timeout=30)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(
            f"POST /v2/models/medseg/infer HTTP/1.1\r\nHost: x\r\n{head}"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        socks.append(s)
    time.sleep(1.0)
    for s in socks:
        s.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logged = server["log"].read_text()[before:]
        if _refusals(logged, 499, reason="the client disconnected") == 3:
            break
        time.sleep(0.5)
    assert _refusals(logged, 499, reason="the client disconnected") == 3, logged[-3000:]
    _still_fine(server, case, baseline)


# ---------------------------------------------------------------- property-based


_PARAM_NAMES = [
    "label_convention",
    "channels",
    "spacing",
    "affine",
    "probabilities",
    "binary_data_output",
    "content_encoding",
    "binary_data_size",
]
_DATATYPES = ["FP32", "FP16", "BYTES", "INT64", "UINT8", "BOOL", "FP64", "RGB", ""]
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(["t1,t1gd,t2,flair", "1,1,1", "32,32,32", "brats2023", "base64", "false"]),
    lambda kids: (
        st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=12,
)
_params = st.dictionaries(st.sampled_from(_PARAM_NAMES), _json_values, max_size=4)
_shapes = st.lists(st.integers(-5, 2**40) | st.sampled_from([1, 4, 8, 16]), max_size=6)
_specs = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["image", "nifti", "x"]),
        "datatype": st.sampled_from(_DATATYPES),
        "shape": _shapes,
        "parameters": _params,
    }
)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    specs=st.lists(_specs, min_size=1, max_size=2),
    params=_params,
    tail=st.binary(max_size=600),
    header=st.one_of(st.none(), st.integers(-3, 5000).map(str), st.text(max_size=5)),
    content_type=st.sampled_from(["application/json", "application/octet-stream", "text/x"]),
)
def test_fuzzed_rest_requests_are_never_a_5xx(
    server: dict[str, Any],
    specs: list[dict[str, Any]],
    params: dict[str, Any],
    tail: bytes,
    header: str | None,
    content_type: str,
) -> None:
    head = json.dumps({"inputs": specs, "parameters": params}).encode()
    headers = {"content-type": content_type}
    if header is not None and header.isascii() and header.isprintable():
        headers[HEADER] = header
    r = _infer(server, head + tail, headers)
    assert r.status_code < 500, (specs, params, header, r.text)


def _to_param(pb: Any, value: Any) -> Any:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return pb.InferParameter(int64_param=value)
    return pb.InferParameter(string_param=str(value))


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    spec=_specs,
    params=_params,
    raw=st.binary(max_size=600),
)
def test_fuzzed_grpc_requests_are_never_internal(
    server: dict[str, Any], spec: dict[str, Any], params: dict[str, Any], raw: bytes
) -> None:
    import grpc

    pb = _pb()
    request = pb.ModelInferRequest(
        model_name="medseg",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name=spec["name"],
                datatype=spec["datatype"],
                shape=[max(-(2**63), min(s, 2**63 - 1)) for s in spec["shape"]],
                parameters={k: _to_param(pb, v) for k, v in spec["parameters"].items()},
            )
        ],
        parameters={k: _to_param(pb, v) for k, v in params.items()},
        raw_input_contents=[raw],
    )
    try:
        _grpc_call(server, request)
    except grpc.RpcError as err:
        assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
            spec,
            params,
            err.details(),
        )


def test_after_the_fuzzing_the_server_is_fine(
    server: dict[str, Any], case: Path, baseline: int
) -> None:
    """Runs after the two property tests (file order): good answers, RSS within the bound."""
    _still_fine(server, case, baseline)
    assert predict(server["grpc"], [case], grpc=True).volumes_ml.keys() == set(REGIONS)


def test_header_length_that_is_not_a_plain_decimal_is_a_400(
    server: dict[str, Any], case: Path, baseline: int
) -> None:
    """Issue 22 item 4: "²" passes ``str.isdigit()`` and 5000 digits pass it too; ``int()``
    rejects both (a 500 with a traceback). Each is a 400 that names the header."""
    body = orjson.dumps(_tensor_doc([1, 4, 8, 8, 8]))
    values = ["²", "1²", "1" * 5000, "9" * 40, "-1", "+12", "0x10", "1e3", "", str(len(body) + 1)]
    before = server["log"].read_text()
    for value in values:
        r = httpx.post(  # latin-1 on the wire, as uvicorn decodes it
            f"{server['rest']}/v2/models/medseg/infer",
            content=body,
            headers={HEADER: value.encode("latin-1")},
            timeout=60,
        )
        assert r.status_code == 400, (value[:20], r.text)
        assert HEADER in r.json()["error"], (value[:20], r.text)
        assert "ValueError" not in r.text and "int()" not in r.text
    logged = server["log"].read_text()[len(before) :]
    assert _refusals(logged, 400, "POST /v2/models/medseg/infer") == len(values)
    assert "Traceback" not in logged
    _still_fine(server, case, baseline)


def test_the_model_cannot_be_unloaded_and_readiness_is_the_models(
    server: dict[str, Any], case: Path, baseline: int
) -> None:
    """Issue 22 item 3: kserve's repository extension let any client unload the one model
    (REST 200, gRPC INTERNAL) while ``/v2/health/ready`` still said ready and every infer was a
    404. Both are refused, and the model still answers; readiness over REST and gRPC is true."""
    import grpc

    with clean_argv():
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
    pb = _pb()
    for action in ("unload", "load"):
        r = httpx.post(f"{server['rest']}/v2/repository/models/medseg/{action}", timeout=30)
        assert r.status_code == 403, (action, r.text)
        assert "repository extension is disabled" in r.json()["error"]
    with grpc.insecure_channel(server["grpc"]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for call, request in (
            (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="medseg")),
            (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="medseg")),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="medseg"), timeout=30).ready
    assert httpx.get(f"{server['rest']}/v2/health/ready", timeout=30).status_code == 200
    assert httpx.get(f"{server['rest']}/v2/models/medseg/ready", timeout=30).status_code == 200
    _still_fine(server, case, baseline)
    assert predict(server["grpc"], [case], grpc=True).volumes_ml.keys() == set(REGIONS)


# ---------------------------------------------------------------- issue 22, items 5, 7, 8, 9


def test_a_grid_that_cannot_be_placed_is_a_400(
    server: dict[str, Any], case: Path, baseline: int
) -> None:
    """Issue 22 item 5: a tensor 1e30 mm from the origin made the foreground crop empty (a
    500, then a silent empty mask): float32 cannot tell its voxels apart. It is a 400 naming
    ``max_position_mm``; a grid near the origin is answered."""
    far = np.eye(4)
    far[0, 3] = 1e30
    for affine, expected in ((far, 400), (np.eye(4), 200)):
        doc = _tensor_doc([1, 4, 8, 8, 8], affine=affine.ravel().tolist())
        r = _infer(server, orjson.dumps(doc))
        assert r.status_code == expected, r.text
    assert (
        "max_position_mm=100000"
        in _infer(
            server, orjson.dumps(_tensor_doc([1, 4, 8, 8, 8], affine=far.ravel().tolist()))
        ).json()["error"]
    )
    _still_fine(server, case, baseline)


def test_user_strings_cannot_forge_log_lines(
    server: dict[str, Any], case: Path, baseline: int
) -> None:
    """Issue 22 item 7: a URL-decoded model name, a request id, a parameter and a gRPC
    ``model_name`` with newlines reached the log raw, each a forged line of its own. Every one
    is logged escaped, on the line of its own record."""
    import grpc

    pb = _pb()
    before = len(server["log"].read_text())
    forged = "\n2026-01-01 00:00:00.000 1 kserve INFO [x.py:f():1] FORGED"
    assert (
        httpx.post(
            f"{server['rest']}/v2/models/m%0AFORGED-path%0D%0AFORGED-cr/infer", content=b"{}"
        ).status_code
        == 404
    )
    doc = _tensor_doc([1, 4, 8, 8, 8], label_convention="x" + forged)
    doc["id"] = "id" + forged
    assert _infer(server, orjson.dumps(doc)).status_code == 400
    request = pb.ModelInferRequest(
        model_name="m" + forged,
        id="id" + forged,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[1])],
        raw_input_contents=[b"\0" * 4],
    )
    with pytest.raises(grpc.RpcError) as err:
        _grpc_call(server, request)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    logged = server["log"].read_text()[before:]
    lines = logged.splitlines()
    assert "FORGED-path" in logged and "FORGED" in logged  # they were logged ...
    assert not [
        line
        for line in lines
        if "FORGED" in line and line.lstrip().startswith(("2026-01-01", "FORGED"))
    ], logged  # ... never as a line of their own
    refusals = [json.loads(line[line.index('{"event"') :]) for line in lines if '{"event"' in line]
    assert any("FORGED" in r["where"] + r["reason"] for r in refusals)  # whole JSON lines
    _still_fine(server, case, baseline)


def test_long_ids_and_parameters_are_refused_by_name(
    server: dict[str, Any], case: Path, baseline: int
) -> None:
    """Issue 22 item 9: a 200 MB ``id`` was echoed in a 200 MB answer, a 200 MB gRPC parameter
    stayed resident. Ids, parameter names and string values over ``max_param_chars`` are a 400
    (INVALID_ARGUMENT) naming the limit, with a small answer."""
    import grpc

    pb = _pb()
    long = "x" * (LIMITS.max_param_chars + 1)
    docs = []
    for where in ("id", "value", "name", "input"):
        doc = _tensor_doc([1, 4, 8, 8, 8])
        if where == "id":
            doc["id"] = "x" * (4 << 20)  # 4 MiB: what used to come back whole
        elif where == "value":
            doc["parameters"] = {"note": long}
        elif where == "name":
            doc["parameters"] = {long: 1}
        else:
            doc["inputs"][0]["parameters"] = {"channels": long}
        docs.append(doc)
    for doc in docs:
        r = _infer(server, orjson.dumps(doc))
        assert r.status_code == 400, r.text[:200]
        assert f"max_param_chars={LIMITS.max_param_chars}" in r.json()["error"], r.text[:200]
        assert len(r.content) < 1000
    tensor = pb.ModelInferRequest.InferInputTensor
    requests = [
        pb.ModelInferRequest(model_name="medseg", id=long),
        pb.ModelInferRequest(
            model_name="medseg", parameters={"note": pb.InferParameter(string_param=long)}
        ),
        pb.ModelInferRequest(model_name=long),
    ]
    for request in requests:
        request.inputs.append(tensor(name="image", datatype="FP32", shape=[1, 4, 8, 8, 8]))
        request.raw_input_contents.append(b"\0" * 4 * 4 * 512)
        with pytest.raises(grpc.RpcError) as err:
            _grpc_call(server, request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()[:200]
        assert "max_param_chars" in err.value.details()
    # A refused call's message is not kept: grpc holds the call's exception (and its frames,
    # and with them the message) after the call; five 6 MB parameters leaked 18 MB each.
    big = pb.ModelInferRequest(
        model_name="medseg", parameters={"note": pb.InferParameter(string_param="x" * (6 << 20))}
    )
    resident = []
    for _ in range(5):
        with pytest.raises(grpc.RpcError):
            _grpc_call(server, big)
        resident.append(_rss(server["pid"])["VmRSS"])
    assert resident[-1] - resident[0] < 20, resident
    _still_fine(server, case, baseline)


def _busy_count(rest: str) -> float:
    """``medseg_request_errors_total{class="busy"}`` as the server exposes it."""
    for line in httpx.get(f"{rest}/metrics", timeout=30).text.splitlines():
        if line.startswith('medseg_request_errors_total{class="busy"}'):
            return float(line.split()[-1])
    return 0.0


def _hold(port: int, declared: int) -> socket.socket:
    """A request that declares ``declared`` bytes and sends one: it holds its place."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(
        f"POST /v2/models/medseg/infer HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {declared}\r\n\r\n{{".encode()
    )
    return s


def test_every_overload_refusal_is_a_counted_503_with_retry_after(
    model_dir: Path, case: Path, tmp_path: Path
) -> None:
    """Issue 22 item 8: uvicorn's connection cap answered a bare 503 that nobody counted, and a
    client still uploading when the in-flight budget was full got a connection reset. Every
    refusal, for the request cap or the budget, REST or gRPC, is now a 503 (RESOURCE_EXHAUSTED)
    that the client reads, with Retry-After, and counted as ``busy``."""
    import grpc

    from model_server.rest import InflightBudget

    env = {
        "OMP_NUM_THREADS": "1",
        "MEDSEG_SERVER_MAX_REQUEST_MB": "48",
        "MEDSEG_SERVER_MAX_INFLIGHT_MB": "48",
        "MEDSEG_SERVER_MAX_CONNECTIONS": "4",
        "MEDSEG_SERVER_BODY_IDLE_S": "3",
    }
    with model_server(model_dir, tmp_path / "server.log", env) as running:
        port, refused = running.ports[0], 0
        before = _busy_count(running.url)
        # 1. the request cap: four requests hold the server; the fifth is refused, readably,
        # also while it is still uploading 32 MiB
        holders = [_hold(port, 16) for _ in range(4)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = httpx.get(f"{running.url}/v2/health/ready", timeout=30)
            if r.status_code == 503:
                break
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert "max_connections=4" in r.json()["error"]
        refused += 1
        for _ in range(3):
            r = httpx.post(
                f"{running.url}/v2/models/medseg/infer", content=b"\0" * (32 << 20), timeout=60
            )
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            refused += 1
        for s in holders:
            s.close()
        # 2. the in-flight budget: one declared 48 MiB body fills it
        time.sleep(0.5)
        holder = _hold(port, 48 << 20)
        time.sleep(0.5)
        for _ in range(3):
            r = httpx.post(
                f"{running.url}/v2/models/medseg/infer", content=b"\0" * (32 << 20), timeout=60
            )
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            assert "max_inflight_mb=48" in r.json()["error"]
            refused += 1
        pb = _pb()
        request = pb.ModelInferRequest(model_name="medseg")
        with pytest.raises(grpc.RpcError) as err:
            _grpc_call({"grpc": running.grpc}, request)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after", "5") in tuple(err.value.trailing_metadata())
        refused += 1
        holder.close()
        time.sleep(0.5)
        assert _busy_count(running.url) - before == refused
        assert predict(running.url, [case]).volumes_ml.keys() == set(REGIONS)
        # issue 22 item 9: a refused 40 MB id leaves nothing resident once its answer is sent
        resident = _rss(running.pid)["VmRSS"]
        doc = {**_tensor_doc([1, 4, 8, 8, 8]), "id": "x" * (40 << 20)}
        r = _infer({"rest": running.url}, orjson.dumps(doc))
        assert r.status_code == 400 and "max_param_chars" in r.json()["error"]
        time.sleep(InflightBudget.RELEASE_DELAY_S + 1)
        assert _rss(running.pid)["VmRSS"] - resident < 32, (resident, _rss(running.pid))


def test_an_error_that_escapes_the_app_is_counted_once() -> None:
    """Issue 22 item 8: 500s raised outside the model were not counted. The middleware counts
    every error answer by its status, and an exception that escapes the app as a 500."""
    import asyncio

    from prometheus_client import REGISTRY

    from model_server.rest import BodyLimits, InflightBudget

    async def fails(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    async def answers_500(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def run(app: Any) -> None:
        limits = ServerLimits()
        middleware = BodyLimits(app, limits, InflightBudget(limits.max_inflight_bytes))
        scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            pass

        await middleware(scope, receive, send)

    def internal() -> float:
        sample = REGISTRY.get_sample_value("medseg_request_errors_total", {"class": "internal"})
        return sample or 0.0

    start = internal()
    with pytest.raises(RuntimeError):
        asyncio.run(run(fails))
    asyncio.run(run(answers_500))
    assert internal() - start == 2


def test_a_model_not_ready_is_a_503_with_retry_after() -> None:
    """Issue 22 item 8: every 503 tells the client when to come back, a model not ready too."""
    import asyncio

    from fastapi import Request
    from kserve.errors import ModelNotReady

    from model_server.rest import refusal_response

    scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer", "headers": []}
    request = Request({**scope, "query_string": b"", "scheme": "http", "server": ("x", 80)})
    answer = asyncio.run(refusal_response(request, ModelNotReady("m"), LIMITS))
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
