"""A binary-safe, fast Open Inference Protocol v2 REST infer route inside kserve's ModelServer.

Why: with kserve 0.21 a 136 MiB FP32 tensor sent with the binary tensor data extension spends
most of its time in the REST layer before ``predict`` (``InferRequest.from_bytes`` turns the raw
buffer into a Python list of 35 M floats with ``set_data_from_numpy(..., binary_data=False)``;
FastAPI's ``Union[InferenceRequest, bytes]`` body first tries JSON/pydantic on the whole buffer),
and outputs are serialised as JSON lists unless each is asked for as binary. See
``benchmarks/bench_serving.py`` for the measured figures.

What: :func:`install` adds ``POST /v2/models/{name}[/versions/{v}]/infer`` to kserve's own FastAPI
app *before* kserve registers its routes, so Starlette matches ours first while everything else
(health, metadata, v1, metrics, exception handlers, the DataPlane and the model's
preprocess/predict/postprocess) stays kserve's. The route:

* reads the body once, refusing more than ``max_request_bytes`` (413) before reading it all;
* parses the JSON header with orjson and maps each binary input onto the body without copying
  (``np.frombuffer`` on a ``memoryview``); JSON ``data`` lists are still accepted;
* calls ``DataPlane.infer``;
* answers binary outputs as raw bytes after the JSON header (``Inference-Header-Content-Length``)
  when the request sets ``binary_data_output`` or an output's ``binary_data``, or sent binary
  inputs; JSON otherwise (BYTES outputs then travel base64-encoded, marked by the output
  parameter ``content_encoding: base64``, as raw bytes cannot be JSON strings).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from kserve.errors import InvalidInput
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import (
    InferInput,
    InferRequest,
    InferResponse,
    RequestedOutput,
    deserialize_bytes_tensor,
    to_np_dtype,
)

__all__ = ["HEADER_LENGTH", "encode_response", "install", "parse_request"]

#: The binary tensor data extension's header naming the JSON part's length.
HEADER_LENGTH = "inference-header-content-length"


def _error(status: int, message: str) -> Response:
    return Response(orjson.dumps({"error": message}), status, media_type="application/json")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{what} must be a non-negative integer, got {value!r}")
    return value


def parse_request(
    body: bytes | bytearray, json_length: int | None, model_name: str
) -> InferRequest:
    """An ``InferRequest`` from a v2 REST body, binary inputs viewed in place.

    Raises:
        InvalidInput: For anything that is not a well-formed v2 request.
    """
    if not body:
        raise InvalidInput("empty request body")
    if json_length is None:
        json_length = len(body)
    if not 0 < json_length <= len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {json_length} but the body has {len(body)} bytes")
    view = memoryview(body)
    try:
        doc = orjson.loads(view[:json_length])
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request JSON is malformed: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise InvalidInput("request must be a JSON object with a non-empty 'inputs' list")
    params = doc.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    offset = json_length
    inputs = []
    for n, spec in enumerate(doc["inputs"]):
        if not isinstance(spec, dict):
            raise InvalidInput(f"input {n} must be an object")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInput(f"input {n} needs a string 'name' and 'datatype'")
        if not isinstance(shape, list):
            raise InvalidInput(f"input {name!r}: 'shape' must be a list of integers")
        shape = [_int(s, f"input {name!r} shape") for s in shape]
        dtype = to_np_dtype(datatype)
        if dtype is None:
            raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r}")
        iparams = spec.get("parameters") or {}
        if not isinstance(iparams, dict):
            raise InvalidInput(f"input {name!r}: 'parameters' must be an object")
        inp = InferInput(name=name, shape=shape, datatype=datatype, parameters=iparams or None)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if "binary_data_size" in iparams:
            size = _int(iparams["binary_data_size"], f"input {name!r} binary_data_size")
            if offset + size > len(body):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size} runs past the body's end "
                    f"({len(body) - offset} bytes left)"
                )
            raw = view[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                try:
                    items = deserialize_bytes_tensor(bytes(raw))
                except Exception as exc:
                    raise InvalidInput(f"input {name!r}: malformed BYTES framing: {exc}") from None
                if items.size != count:
                    raise InvalidInput(
                        f"input {name!r}: {items.size} BYTES elements for shape {shape}"
                    )
                inp._data = items.reshape(shape)
            else:
                if size != count * np.dtype(dtype).itemsize:
                    raise InvalidInput(
                        f"input {name!r}: {size} bytes do not hold {datatype} of shape {shape} "
                        f"({count * np.dtype(dtype).itemsize} bytes)"
                    )
                inp._raw_data = raw  # as_numpy() is np.frombuffer on this view: no copy
        elif "data" in spec:
            inp._data = _json_data(spec["data"], name, datatype, dtype, shape, count)
        else:
            raise InvalidInput(f"input {name!r} has neither 'data' nor 'binary_data_size'")
        inputs.append(inp)
    if offset != len(body):
        raise InvalidInput(f"{len(body) - offset} bytes after the last binary input")
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise InvalidInput("'outputs' must be a list")
        outputs = []
        for o in doc["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise InvalidInput("each requested output needs a string 'name'")
            if o.get("parameters") is not None and not isinstance(o["parameters"], dict):
                raise InvalidInput(f"output {o['name']!r}: 'parameters' must be an object")
            outputs.append(RequestedOutput(name=o["name"], parameters=o.get("parameters")))
    request_id = doc.get("id")
    return InferRequest(
        model_name=model_name,
        infer_inputs=inputs,
        request_id=request_id if isinstance(request_id, str) else None,
        parameters=params,
        request_outputs=outputs,
    )


def _json_data(
    data: Any, name: str, datatype: str, dtype: Any, shape: list[int], count: int
) -> np.ndarray:
    if datatype == "FP16":
        raise InvalidInput(f"input {name!r}: FP16 needs the binary data extension")
    flat = data
    if datatype == "BYTES":
        arr = np.empty(0, dtype=np.object_)
        items = np.asarray(flat, dtype=np.object_).reshape(-1)
        if not all(isinstance(x, str) for x in items):
            raise InvalidInput(f"input {name!r}: BYTES data must be strings in JSON")
        arr = np.array([x.encode() for x in items], dtype=np.object_)
    else:
        try:
            arr = np.asarray(flat, dtype=dtype).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            raise InvalidInput(f"input {name!r}: data are not {datatype} numbers") from None
    if arr.size != count:
        raise InvalidInput(f"input {name!r}: {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def encode_response(
    response: InferResponse, request: InferRequest, binary_inputs: bool
) -> tuple[bytes, dict[str, str]]:
    """Body and headers for a v2 response; binary outputs follow the JSON part."""
    params = request.parameters or {}
    default_binary = bool(params.get("binary_data_output", binary_inputs))
    wanted = {o.name: o for o in request.request_outputs or []}
    outputs, chunks = [], []
    for out in response.outputs:
        if wanted and out.name not in wanted:
            continue
        req = wanted.get(out.name)
        binary = default_binary
        if req is not None and req.parameters and "binary_data" in req.parameters:
            binary = bool(req.parameters["binary_data"])
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        oparams = dict(out.parameters or {})
        if binary:
            raw = out._raw_data if out._raw_data is not None else out.as_numpy().tobytes()
            oparams["binary_data_size"] = len(raw)
            chunks.append(raw)
        elif out.datatype == "BYTES":
            entry["data"] = [base64.b64encode(bytes(b)).decode() for b in out.as_numpy().ravel()]
            oparams["content_encoding"] = "base64"
        elif out.datatype == "FP16":
            raise InvalidInput(f"output {out.name!r} is FP16: request it with binary_data")
        else:
            entry["data"] = out.as_numpy().ravel().tolist()
        if oparams:
            entry["parameters"] = oparams
        outputs.append(entry)
    missing = set(wanted) - {o["name"] for o in outputs}
    if missing:
        raise InvalidInput(f"unknown output(s) requested: {', '.join(sorted(missing))}")
    doc: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": outputs,
    }
    if response.parameters:
        doc["parameters"] = dict(response.parameters)
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, {"content-type": "application/json"}
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return b"".join([head, *chunks]), headers


async def _read_body(request: Request, declared: str | None, limit: int) -> bytearray | None:
    """The whole body, or None past ``limit``.

    With a Content-Length, one preallocated buffer is filled in place: growing a bytearray chunk
    by chunk copies a 136 MiB body several times over.
    """
    if declared is not None and declared.isdigit():
        size = int(declared)
        body = bytearray(size)
        view, filled = memoryview(body), 0
        async for chunk in request.stream():
            end = filled + len(chunk)
            if end > size:
                raise InvalidInput(f"request body is longer than its Content-Length ({size})")
            view[filled:end] = chunk
            filled = end
        del view
        return body if filled == size else body[:filled]
    grown = bytearray()
    async for chunk in request.stream():
        grown += chunk
        if len(grown) > limit:
            return None
    return grown


def install(app: FastAPI, dataplane: DataPlane, max_request_bytes: int) -> None:
    """Route v2 REST infer requests on ``app`` to the fast path (call before the server starts)."""

    async def infer(request: Request, model_name: str, v: str | None = None) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            return _error(
                413, f"request of {int(declared)} bytes exceeds the limit of {max_request_bytes}"
            )
        body = await _read_body(request, declared, max_request_bytes)
        if body is None:
            return _error(413, f"request exceeds the limit of {max_request_bytes} bytes")
        header = request.headers.get(HEADER_LENGTH)
        if header is not None and not header.isdigit():
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {header!r}")
        if not await dataplane.model_ready(model_name, True):
            from kserve.errors import ModelNotReady

            raise ModelNotReady(model_name)
        parsed = parse_request(body, int(header) if header else None, model_name)
        headers = {k.lower(): v for k, v in request.headers.items()}
        result, response_headers = await dataplane.infer(model_name, parsed, headers)
        if not isinstance(result, InferResponse):
            raise InvalidInput("the model did not answer a v2 response")
        content, out_headers = encode_response(result, parsed, binary_inputs=header is not None)
        response_headers = {
            k: v
            for k, v in (response_headers or {}).items()
            if k.lower() not in ("content-length", "content-type")
        }
        return Response(content, 200, headers={**response_headers, **out_headers})

    paths = ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{v}/infer")
    for path in paths:
        app.add_api_route(path, infer, methods=["POST"], include_in_schema="{v}" not in path)
