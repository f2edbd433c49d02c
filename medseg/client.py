"""Client of the medseg model server: Open Inference Protocol v2 over REST (binary) or gRPC.

``medseg predict`` sends a case — a BraTS case folder, one 4D NIfTI, or four 3D files — as NIfTI
bytes (or, with ``tensor=True``, as a raw FP16/FP32 tensor read here), and gets back the mask
NIfTI and the region volumes. REST uses the binary tensor data extension both ways; gRPC uses
``raw_input_contents`` with message limits raised to fit a full case.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from medseg.codec import serialize_bytes, split_bytes_tensor
from medseg.config import CHANNELS, REGIONS
from medseg.errors import MedsegError
from medseg.layouts import SUFFIXES

__all__ = ["Prediction", "case_files", "predict", "serialize_bytes", "wait_ready"]

#: gRPC message limit of the client (the server's default limit is 256 MiB too).
GRPC_LIMIT = 256 * 1024 * 1024
_HEADER = "inference-header-content-length"


@dataclass
class Prediction:
    """What the server answered, and how long it took."""

    mask: bytes
    volumes_ml: dict[str, float]
    latency_s: float
    compute_ms: int | None
    label_convention: str
    probabilities: np.ndarray | None = None


def case_files(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """The NIfTI files of a case and their channel order.

    Args:
        paths: A BraTS 2021/2023 case folder, one 4D NIfTI, or four 3D NIfTI in canonical order
            (``t1, t1gd, t2, flair``).

    Raises:
        MedsegError: If the paths are none of those.
    """
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        for layout in ("brats2021", "brats2023"):
            found = {}
            for channel in CHANNELS:
                stem = f"{folder.name}{SUFFIXES[layout][channel]}"
                hits = [folder / f"{stem}{e}" for e in (".nii.gz", ".nii")]
                hit = next((h for h in hits if h.is_file()), None)
                if hit is not None:
                    found[channel] = hit
            if len(found) == len(CHANNELS):
                return [found[c] for c in CHANNELS], list(CHANNELS)
        raise MedsegError(
            f"{folder}: not a BraTS case folder (expected {folder.name}_t1.nii.gz, _t1ce, _t2, "
            f"_flair, or the 2023 names -t1n, -t1c, -t2w, -t2f)"
        )
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MedsegError(f"no such file: {', '.join(map(str, missing))}")
    if len(paths) not in (1, len(CHANNELS)):
        raise MedsegError(f"give one 4D NIfTI, four 3D files or a case folder, not {len(paths)}")
    return list(paths), list(CHANNELS)


def wait_ready(url: str, timeout: float, proc: Any = None, log: Path | None = None) -> None:
    """Wait until ``URL/v2/health/ready`` answers 200.

    Args:
        url: ``http://HOST:PORT`` of the server.
        timeout: Seconds to wait.
        proc: The server's ``Popen``; its exit ends the wait early.
        log: The server's log file, quoted in the error.

    Raises:
        MedsegError: If the server exits or is not ready in time.
    """
    import httpx

    def tail() -> str:
        return log.read_text(errors="replace")[-2000:] if log and log.is_file() else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise MedsegError(f"model server exited with code {proc.returncode}: {tail()}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise MedsegError(f"model server at {url} not ready after {timeout:.0f} s: {tail()}")


def _tensor_input(files: Sequence[Path], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The files as one ``[1, C, X, Y, Z]`` tensor, channels in the files' order."""
    import nibabel as nib

    images: list[Any] = [nib.load(str(f)) for f in files]
    if len(images) == 1:
        data = np.moveaxis(np.asarray(images[0].dataobj, dtype=np.float32), -1, 0)
    else:
        data = np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in images])
    np_dtype = np.float16 if dtype == "FP16" else np.float32
    return np.ascontiguousarray(data, dtype=np_dtype)[None], images[0].affine


def predict(
    url: str,
    paths: Sequence[Path],
    grpc: bool = False,
    model: str = "medseg",
    label_convention: str = "brats2021",
    channels: Sequence[str] | None = None,
    tensor: str | None = None,
    probabilities: bool = False,
    timeout: float = 600.0,
) -> Prediction:
    """Send one case to the server and return its answer.

    Args:
        url: ``http://HOST:PORT`` for REST, ``HOST:PORT`` for gRPC.
        paths: See :func:`case_files`.
        grpc: Use gRPC instead of REST.
        model: Model name on the server.
        label_convention: Convention of the returned label map.
        channels: Channel order of a 4D NIfTI or of four files (default: canonical).
        tensor: ``FP16`` or ``FP32``: decode here and send a raw tensor instead of NIfTI bytes.
        probabilities: Also ask for the probabilities.
        timeout: Seconds to wait for the answer.
    """
    files, order = case_files(paths)
    order = list(channels) if channels else order
    params: dict[str, Any] = {"label_convention": label_convention}
    if probabilities:
        params["probabilities"] = True
    # the channel names always travel: the server never guesses the order
    if tensor:
        array, affine = _tensor_input(files, tensor)
        inp = {
            "name": "image",
            "datatype": tensor,
            "shape": list(array.shape),
            "parameters": {
                "affine": ",".join(f"{v:.9g}" for v in affine.ravel()),
                "channels": ",".join(order),
            },
        }
        payload = array.tobytes()
    else:
        blobs = [f.read_bytes() for f in files]
        inp = {
            "name": "nifti",
            "datatype": "BYTES",
            "shape": [len(blobs)],
            "parameters": {"channels": ",".join(order)},
        }
        payload = serialize_bytes(blobs)
    outputs = ["mask", "volumes_ml"] + (["probabilities"] if probabilities else [])
    send = _grpc_infer if grpc else _rest_infer
    _import_transport(grpc)  # module imports (kserve's protobufs: ~1 s) are not latency
    started = time.perf_counter()
    answer, reply_params = send(url, model, inp, payload, params, outputs, timeout)
    latency = time.perf_counter() - started
    volumes = np.frombuffer(answer["volumes_ml"], dtype=np.float32)
    probs = None
    if probabilities:
        probs = np.frombuffer(answer["probabilities"], dtype=np.float16)
    try:
        mask = bytes(split_bytes_tensor(answer["mask"], "output 'mask'")[0])
    except (MedsegError, IndexError):
        raise MedsegError("the server's 'mask' output is not one BYTES element") from None
    return Prediction(
        mask=mask,
        volumes_ml={r: float(v) for r, v in zip(REGIONS, volumes, strict=True)},
        latency_s=latency,
        compute_ms=reply_params.get("compute_ms"),
        label_convention=str(reply_params.get("label_convention", label_convention)),
        probabilities=probs,
    )


def _import_transport(grpc: bool) -> None:
    if grpc:
        import grpc as _grpc  # noqa: F401

        from medseg.kserve_import import clean_argv

        with clean_argv():
            from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc  # noqa: F401
    else:
        import httpx  # noqa: F401


def _rest_infer(
    url: str,
    model: str,
    inp: dict[str, Any],
    payload: bytes,
    params: dict[str, Any],
    outputs: list[str],
    timeout: float,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    import httpx

    inp = {**inp, "parameters": {**inp["parameters"], "binary_data_size": len(payload)}}
    head = orjson.dumps(
        {
            "inputs": [inp],
            "parameters": params,
            "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
        }
    )
    try:
        response = httpx.post(
            f"{url.rstrip('/')}/v2/models/{model}/infer",
            content=iter((head, payload)),  # no 136 MiB concatenation
            headers={
                "content-type": "application/octet-stream",
                "content-length": str(len(head) + len(payload)),
                _HEADER: str(len(head)),
            },
            timeout=timeout,
        )
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise MedsegError(f"model server {url}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise MedsegError(f"server answered {response.status_code}: {response.text[:500]}")
    body = response.content
    json_len = int(response.headers.get(_HEADER, len(body)))
    doc = orjson.loads(body[:json_len])
    out, offset = {}, json_len
    for o in doc["outputs"]:
        size = o["parameters"]["binary_data_size"]
        out[o["name"]] = body[offset : offset + size]
        offset += size
    return out, doc.get("parameters") or {}


def _grpc_infer(
    url: str,
    model: str,
    inp: dict[str, Any],
    payload: bytes,
    params: dict[str, Any],
    outputs: list[str],
    timeout: float,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    def _param(value: Any) -> Any:
        if isinstance(value, bool):
            return pb.InferParameter(bool_param=value)
        if isinstance(value, int):
            return pb.InferParameter(int64_param=value)
        return pb.InferParameter(string_param=str(value))

    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name=inp["name"],
                datatype=inp["datatype"],
                shape=inp["shape"],
                parameters={k: _param(v) for k, v in inp["parameters"].items()},
            )
        ],
        parameters={k: _param(v) for k, v in params.items()},
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs],
        raw_input_contents=[payload],
    )
    options = [
        ("grpc.max_send_message_length", GRPC_LIMIT),
        ("grpc.max_receive_message_length", GRPC_LIMIT),
    ]
    with grpc.insecure_channel(url.removeprefix("grpc://"), options=options) as channel:
        try:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise MedsegError(f"server answered {exc.code().name}: {exc.details()}") from None
    out = {o.name: raw for o, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)}
    reply_params = {
        k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in reply.parameters.items()
    }
    return out, reply_params
