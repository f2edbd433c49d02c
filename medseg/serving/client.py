"""Client of the medseg model server: Open Inference Protocol v2 over REST (binary) or gRPC.

``medseg predict`` sends a case — a BraTS case folder, one 4D NIfTI, or four 3D files — as NIfTI
bytes (or, with ``tensor=True``, as a raw FP16/FP32 tensor read here), and gets back the mask
NIfTI and the region volumes. REST uses the binary tensor data extension both ways; gRPC uses
``raw_input_contents`` with message limits raised to fit a full case, written after the rest of
the message and read back as views (:func:`~medseg.serving.codec.join_grpc_raw`,
:func:`~medseg.serving.codec.split_grpc_raw`): the tensors are never copied into or out of protobuf
objects.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.core.errors import MedsegError
from medseg.core.settings import ServerLimits
from medseg.data.layouts import SUFFIXES
from medseg.serving.codec import (
    HEADER_LENGTH,
    encode_v2_body,
    join_grpc_raw,
    serialize_bytes,
    split_bytes_tensor,
    split_grpc_raw,
    split_v2_body,
    tensor_view,
)
from medseg.tasks.brats import CHANNELS

__all__ = [
    "Classification",
    "Prediction",
    "Tensor",
    "case_files",
    "classify",
    "infer",
    "predict",
    "serialize_bytes",
    "wait_ready",
]

#: gRPC message limit of the client: the server's default request limit.
GRPC_LIMIT = ServerLimits.model_fields["max_request_mb"].default * 1024 * 1024


@dataclass
class Tensor:
    """One binary output as the server answered it: datatype, shape, raw bytes, parameters.

    ``volumes_ml``'s parameter ``regions`` names its elements.
    """

    datatype: str
    shape: list[int]
    raw: memoryview
    parameters: dict[str, Any] = field(default_factory=dict)

    def array(self) -> np.ndarray:
        """The output as an array (a view of :attr:`raw`; not for BYTES)."""
        return tensor_view(self.raw, self.datatype, self.shape, "the server's output")


@dataclass
class Prediction:
    """What the server answered, and how long it took."""

    mask: bytes
    volumes_ml: dict[str, float]
    latency_s: float
    compute_ms: int | None
    label_convention: str
    probabilities: np.ndarray | None = None
    labels: np.ndarray | None = None
    model_version: str | None = None
    model_sha256: str | None = None


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


def _case_input(
    files: Sequence[Path], order: Sequence[str], tensor: str | None
) -> tuple[dict[str, Any], bytes]:
    """The v2 input of a case and its payload: NIfTI bytes, or a decoded ``tensor`` (FP16/FP32).

    The channel names always travel: the server never guesses the order.
    """
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
        return inp, array.tobytes()
    blobs = [f.read_bytes() for f in files]
    inp = {
        "name": "nifti",
        "datatype": "BYTES",
        "shape": [len(blobs)],
        "parameters": {"channels": ",".join(order)},
    }
    return inp, serialize_bytes(blobs)


def predict(
    url: str,
    paths: Sequence[Path],
    grpc: bool = False,
    model: str = "medseg",
    label_convention: str | None = None,
    channels: Sequence[str] | None = None,
    tensor: str | None = None,
    probabilities: bool = False,
    timeout: float = 600.0,
    labels: bool = False,
) -> Prediction:
    """Send one case to the server and return its answer.

    Args:
        url: ``http://HOST:PORT`` for REST, ``HOST:PORT`` for gRPC.
        paths: See :func:`case_files`.
        grpc: Use gRPC instead of REST.
        model: Model name on the server.
        label_convention: Convention of the returned label map; without one, the model's
            task's default (BraTS: ``brats2021``).
        channels: Channel order of a 4D NIfTI or of four files (default: canonical).
        tensor: ``FP16`` or ``FP32``: decode here and send a raw tensor instead of NIfTI bytes.
        probabilities: Also ask for the probabilities.
        timeout: Seconds to wait for the answer.
        labels: Also ask for the label map as a plain UINT8 tensor (``Prediction.labels``).
    """
    files, order = case_files(paths)
    order = list(channels) if channels else order
    params: dict[str, Any] = {"label_convention": label_convention} if label_convention else {}
    if probabilities:
        params["probabilities"] = True
    inp, payload = _case_input(files, order, tensor)
    outputs = ["mask", "volumes_ml"]
    outputs += (["probabilities"] if probabilities else []) + (["labels"] if labels else [])
    _import_transport(grpc)  # module imports (kserve's protobufs: ~1 s) are not latency
    started = time.perf_counter()
    answer, reply_params = infer(url, model, inp, payload, params, outputs, timeout, grpc)
    latency = time.perf_counter() - started
    volumes = answer["volumes_ml"].array()
    regions = str(answer["volumes_ml"].parameters.get("regions", "")).split(",")
    probs = answer["probabilities"].array() if probabilities else None
    try:
        mask = bytes(split_bytes_tensor(answer["mask"].raw, "output 'mask'")[0])
    except (MedsegError, IndexError):
        raise MedsegError("the server's 'mask' output is not one BYTES element") from None
    return Prediction(
        mask=mask,
        volumes_ml={r: float(v) for r, v in zip(regions, volumes, strict=True)},
        latency_s=latency,
        compute_ms=reply_params.get("compute_ms"),
        label_convention=str(reply_params.get("label_convention", label_convention or "")),
        probabilities=probs,
        labels=answer["labels"].array() if labels else None,
        model_version=reply_params.get("model_version"),
        model_sha256=reply_params.get("model_sha256"),
    )


@dataclass
class Classification:
    """A classifier's answer for one image, and how long it took."""

    label: str
    probability: float
    probabilities: dict[str, float]
    latency_s: float
    compute_ms: int | None = None
    model_version: str | None = None


def classify(
    url: str, image: bytes, model: str = "medseg", grpc: bool = False, timeout: float = 120.0
) -> Classification:
    """Send one JPEG/PNG image to a classifier (OIP v2, REST or gRPC); its class probabilities.

    Args:
        url: ``http://HOST:PORT`` for REST, ``HOST:PORT`` for gRPC.
        image: The image file's bytes.
        model: Model name on the server.
        grpc: Use gRPC instead of REST.
        timeout: Seconds to wait for the answer.

    Raises:
        MedsegError: If the server cannot be reached, answers an error, or not a classifier's
            outputs.
    """
    inp = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {}}
    _import_transport(grpc)
    started = time.perf_counter()
    answer, params = infer(
        url, model, inp, serialize_bytes([image]), {}, ["probabilities"], timeout, grpc
    )
    latency = time.perf_counter() - started
    probs = answer["probabilities"]
    classes = str(probs.parameters.get("classes", "")).split(",")
    row = probs.array().reshape(-1)
    if len(classes) != len(row):
        raise MedsegError("the server's 'probabilities' output does not name its classes")
    best = int(np.argmax(row))
    return Classification(
        label=classes[best],
        probability=float(row[best]),
        probabilities={c: float(p) for c, p in zip(classes, row, strict=True)},
        latency_s=latency,
        compute_ms=params.get("compute_ms"),
        model_version=params.get("model_version"),
    )


def _import_transport(grpc: bool) -> None:
    if grpc:
        import grpc as _grpc  # noqa: F401

        from medseg.serving.kserve_import import clean_argv

        with clean_argv():
            from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc  # noqa: F401


def infer(
    url: str,
    model: str,
    inp: dict[str, Any],
    payload: bytes | memoryview,
    params: dict[str, Any],
    outputs: Sequence[str],
    timeout: float,
    grpc: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One OIP v2 call with one binary input; the binary outputs by name, and the parameters.

    REST goes through the standard library's ``http.client``: the body's parts are written
    with ``sendall`` one after the other (the tensor is never copied or joined), the answer is
    read whole into one buffer and its outputs are views into it.

    Raises:
        MedsegError: If the server cannot be reached or answers an error.
    """
    send = _grpc_infer if grpc else _rest_infer
    return send(url, model, inp, payload, params, outputs, timeout)


def _rest_infer(
    url: str,
    model: str,
    inp: dict[str, Any],
    payload: bytes | memoryview,
    params: dict[str, Any],
    outputs: Sequence[str],
    timeout: float,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    import http.client
    from urllib.parse import urlsplit

    requested = [{"name": o, "parameters": {"binary_data": True}} for o in outputs]
    parts, headers = encode_v2_body(
        {"parameters": params, "outputs": requested}, "inputs", [(inp, payload)]
    )
    where = urlsplit(url if "://" in url else f"http://{url}")
    if where.scheme != "http" or not where.hostname:
        raise MedsegError(f"model server {url}: expected http://HOST:PORT")
    conn = http.client.HTTPConnection(where.hostname, where.port or 80, timeout=timeout)
    try:
        conn.putrequest("POST", f"{where.path.rstrip('/')}/v2/models/{model}/infer")
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders()
        for part in parts:
            conn.send(part)  # sendall: no copy of a 136 MiB tensor
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise MedsegError(f"model server {url}: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()
    if response.status != 200:
        text = body[:500].decode(errors="replace")
        raise MedsegError(f"server answered {response.status}: {text}")
    header = response.getheader(HEADER_LENGTH)
    try:
        doc, raw = split_v2_body(
            body, int(header) if header and header.isdigit() else None, "outputs", "the answer"
        )
        out = {
            o["name"]: Tensor(o["datatype"], o["shape"], raw[o["name"]], o.get("parameters") or {})
            for o in doc["outputs"]
        }
    except (KeyError, TypeError):
        raise MedsegError("the server's answer lacks a binary output it was asked for") from None
    return out, doc.get("parameters") or {}


def _grpc_request_head(
    model: str, inp: dict[str, Any], params: dict[str, Any], outputs: Sequence[str]
) -> bytes:
    """The serialised ``ModelInferRequest`` without its raw contents (joined to it unchanged)."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    def _param(value: Any) -> Any:
        if isinstance(value, bool):
            return pb.InferParameter(bool_param=value)
        if isinstance(value, int):
            return pb.InferParameter(int64_param=value)
        return pb.InferParameter(string_param=str(value))

    return bytes(
        pb.ModelInferRequest(
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
        ).SerializeToString()
    )


def _grpc_infer(
    url: str,
    model: str,
    inp: dict[str, Any],
    payload: bytes | memoryview,
    params: dict[str, Any],
    outputs: Sequence[str],
    timeout: float,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    head = _grpc_request_head(model, inp, params, outputs)
    raw_in = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
    raw_out = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number
    message = join_grpc_raw(head, raw_in, [payload])

    def received(data: bytes) -> tuple[Any, list[memoryview]]:
        rest, raws = split_grpc_raw(data, raw_out, "the server's ModelInferResponse")
        return pb.ModelInferResponse.FromString(rest), raws

    options = [
        ("grpc.max_send_message_length", GRPC_LIMIT),
        ("grpc.max_receive_message_length", GRPC_LIMIT),
    ]
    with grpc.insecure_channel(url.removeprefix("grpc://"), options=options) as channel:
        call = channel.unary_unary(
            f"/{pb.DESCRIPTOR.services_by_name['GRPCInferenceService'].full_name}/ModelInfer",
            request_serializer=None,  # the message is serialised above
            response_deserializer=received,
        )
        try:
            reply, raws = call(message, timeout=timeout)
        except grpc.RpcError as exc:
            raise MedsegError(f"server answered {exc.code().name}: {exc.details()}") from None
    if len(raws) != len(reply.outputs):
        raise MedsegError("the server's answer lacks a binary output it was asked for")

    def plain(params: Any) -> dict[str, Any]:
        return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in params.items()}

    out = {
        o.name: Tensor(o.datatype, list(o.shape), raw, plain(o.parameters))
        for o, raw in zip(reply.outputs, raws, strict=True)
    }
    return out, plain(reply.parameters)
