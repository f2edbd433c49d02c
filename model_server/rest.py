"""A binary-safe, bounded Open Inference Protocol REST layer inside kserve's ModelServer.

Why: with kserve 0.21 a 136 MiB FP32 tensor sent with the binary tensor data extension spends
most of its time in the REST layer before ``predict`` (``InferRequest.from_bytes`` turns the raw
buffer into a Python list of 35 M floats with ``set_data_from_numpy(..., binary_data=False)``;
FastAPI's ``Union[InferenceRequest, bytes]`` body first tries JSON/pydantic on the whole buffer),
and outputs are serialised as JSON lists unless each is asked for as binary. See
``benchmarks/bench_serving.py`` for the measured figures. And kserve reads any body whole, of any
size, for as long as the client takes, and keeps working for clients that have gone.

What :func:`install` adds to kserve's own FastAPI app, before kserve registers its routes:

* :class:`BodyLimits`, an ASGI middleware around every request: it admits at most
  ``max_connections`` at once (503 with Retry-After beyond), refuses a declared
  ``Content-Length`` over ``max_request_mb`` (413) before reading, holds the replica's in-flight
  request bytes under ``max_inflight_mb`` (503 with Retry-After, after the rest of the body has
  been read and discarded, so that the client reads it; a declared length counts before it
  arrives, and nothing is allocated for it), reads into a buffer that grows with what arrives,
  gives up on a body that pauses longer than ``body_idle_s`` or takes longer than
  ``body_timeout_s`` (408), and counts every error answer by its status;
* ``POST /v2/models/{name}[/versions/{v}]/infer``: parses the JSON header with orjson (at most
  ``max_json_values`` values) and maps each binary input onto the body without copying
  (``np.frombuffer`` on a ``memoryview``), calls ``DataPlane.infer``, and answers binary outputs
  as raw bytes after the JSON header (``Inference-Header-Content-Length``) when the request sets
  ``binary_data_output`` or an output's ``binary_data``, or sent binary inputs; JSON otherwise
  (BYTES outputs then travel base64-encoded, marked by ``content_encoding: base64``);
* ``POST /v1/models/{name}:predict``, the same for v1 JSON;
* ``POST /v2/repository/models/{name}/load`` and ``…/unload`` answered 403
  (:class:`RepositoryDisabled`): kserve's would let any client unload the one model.

Both routes give the request a :class:`~model_server.admission.Ticket`: the client's disconnect
or the request's deadline stops its work before and between the expensive stages. A bad request
is a 4xx with one log line, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.logging import logger
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import (
    InferInput,
    InferRequest,
    InferResponse,
    RequestedOutput,
    to_np_dtype,
)

from medseg.core.errors import InputError
from medseg.core.settings import ServerLimits
from medseg.serving.codec import (
    HEADER_LENGTH,
    check_strings,
    encode_v2_body,
    split_bytes_tensor,
    validate_params,
)
from model_server import compat, dicom_route, logs, memory, metrics
from model_server.admission import RequestAbandoned, Ticket, current_ticket

__all__ = [
    "HEADER_LENGTH",
    "BodyLimits",
    "InflightBudget",
    "RepositoryDisabled",
    "check_request_strings",
    "encode_response",
    "install",
    "json_length",
    "parse_request",
    "refusal_response",
]


class RepositoryDisabled(Exception):
    """A model repository call (load/unload): this predictor serves its one model, always."""

    def __init__(self) -> None:
        super().__init__(
            "the model repository extension is disabled: this server serves one model, "
            "loaded at start, and does not load or unload models on request"
        )


def json_length(header: str | None, body_size: int) -> int | None:
    """The ``Inference-Header-Content-Length`` header's value, or None when it is absent.

    Raises:
        InvalidInput: Unless it is a plain ASCII decimal of at most ``body_size``.
    """
    if header is None:
        return None
    digits = header
    # ASCII digits only (str.isdigit() accepts "²"), never longer than the body's size
    if not (digits.isascii() and digits.isdigit()) or len(digits) > len(str(body_size)):
        raise InvalidInput(
            f"{HEADER_LENGTH} must be a decimal integer of at most the body's "
            f"{body_size} bytes, got {header[:40]!r}"
        )
    return int(digits)


def _error(status: int, message: str) -> Response:
    return Response(orjson.dumps({"error": message}), status, media_type="application/json")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{what} must be a non-negative integer, got {value!r}")
    return value


def load_json(part: bytes | bytearray | memoryview, limits: ServerLimits) -> Any:
    """A JSON document of at most ``max_json_values`` values (counted before parsing).

    Every value after the first follows a ``,`` or opens with ``[``/``{``: their count bounds
    the number of values, so a body of ``[0,0,0,…]`` cannot become gigabytes of Python objects.

    Raises:
        InvalidInput: If the JSON is malformed or holds too many values.
    """
    raw = bytes(part) if isinstance(part, memoryview) else part
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1
    if values > limits.max_json_values:
        raise InvalidInput(
            f"request JSON holds up to {values} values, above max_json_values="
            f"{limits.max_json_values}: send tensors with the binary data extension"
        )
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request JSON is malformed: {exc}") from None


def parse_request(
    body: bytes | bytearray, json_length: int | None, model_name: str, limits: ServerLimits
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
    doc = load_json(view[:json_length], limits)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise InvalidInput("request must be a JSON object with a non-empty 'inputs' list")
    check_request_strings(doc, limits)
    params = doc.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    offset = json_length
    inputs = []
    for n, spec in enumerate(doc["inputs"]):
        inp, offset = _parse_input(n, spec, view, offset, limits)
        inputs.append(inp)
    if offset != len(body):
        raise InvalidInput(f"{len(body) - offset} bytes after the last binary input")
    request_id = doc.get("id")
    return InferRequest(
        model_name=model_name,
        infer_inputs=inputs,
        request_id=request_id if isinstance(request_id, str) else None,
        parameters=params,
        request_outputs=_requested_outputs(doc.get("outputs")),
    )


def _parse_input(
    n: int, spec: Any, view: memoryview, offset: int, limits: ServerLimits
) -> tuple[InferInput, int]:
    """Input ``n`` of a v2 body, its binary data (from ``offset``) viewed in the body.

    Returns:
        The input, and the offset of the next input's binary data.
    """
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
    count = math.prod(shape)
    if count > limits.max_case_voxels:
        raise InvalidInput(
            f"input {name!r}: shape {shape} holds {count} values, above "
            f"max_case_voxels={limits.max_case_voxels}"
        )
    if "binary_data_size" in iparams:
        size = _int(iparams["binary_data_size"], f"input {name!r} binary_data_size")
        if offset + size > len(view):
            raise InvalidInput(
                f"input {name!r}: binary_data_size {size} runs past the body's end "
                f"({len(view) - offset} bytes left)"
            )
        _view_binary(inp, view[offset : offset + size], dtype, count)
        return inp, offset + size
    if "data" in spec:
        data = _json_data(spec["data"], name, datatype, dtype, shape, count)
        compat.set_contents(inp, data=data)
        return inp, offset
    raise InvalidInput(f"input {name!r} has neither 'data' nor 'binary_data_size'")


def _view_binary(inp: InferInput, raw: memoryview, dtype: Any, count: int) -> None:
    """Give ``inp`` its binary data, a view into the body (no copy), once its size fits."""
    name, datatype, shape = inp.name, inp.datatype, list(inp.shape)
    if datatype == "BYTES":
        try:
            blobs = split_bytes_tensor(raw, f"input {name!r}")
        except InputError as exc:
            raise InvalidInput(str(exc)) from None
        if len(blobs) != count:
            raise InvalidInput(f"input {name!r}: {len(blobs)} BYTES elements for shape {shape}")
        items = np.empty(len(blobs), dtype=np.object_)
        items[:] = blobs  # views into the body, no copy
        compat.set_contents(inp, data=items.reshape(shape))
        return
    size = len(raw)
    if size != count * np.dtype(dtype).itemsize:
        raise InvalidInput(
            f"input {name!r}: {size} bytes do not hold {datatype} of shape {shape} "
            f"({count * np.dtype(dtype).itemsize} bytes)"
        )
    compat.set_contents(inp, raw=raw)  # as_numpy() is np.frombuffer on it: no copy


def _requested_outputs(outputs: Any) -> list[RequestedOutput] | None:
    """A v2 body's ``outputs``: each named, its parameters valid (``binary_data`` …)."""
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be a list")
    requested = []
    for o in outputs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidInput("each requested output needs a string 'name'")
        try:
            validate_params(o.get("parameters"))  # binary_data and the like: fail here
        except InputError as exc:
            raise InvalidInput(f"output {o['name']!r}: {exc}") from None
        requested.append(RequestedOutput(name=o["name"], parameters=o.get("parameters")))
    return requested


def check_request_strings(doc: Mapping[str, Any], limits: ServerLimits) -> None:
    """A v2 request's id, parameters and tensor names within ``max_param_chars`` (the data aside).

    Raises:
        InvalidInput: Naming the string that is too long.
    """
    parts: list[tuple[Any, str]] = [
        (doc.get("id"), "request 'id'"),
        (doc.get("parameters"), "request 'parameters'"),
    ]
    for kind in ("inputs", "outputs"):
        specs = doc.get(kind)
        for n, spec in enumerate(specs if isinstance(specs, list) else []):
            if isinstance(spec, Mapping):
                fields = ("name", "datatype", "parameters")
                parts.append(({k: spec[k] for k in fields if k in spec}, f"{kind[:-1]} {n}"))
    try:
        for value, what in parts:
            check_strings(value, what, limits)
    except InputError as exc:
        raise InvalidInput(str(exc)) from None


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
) -> tuple[list[bytes | memoryview], dict[str, str]]:
    """Body parts and headers for a v2 response; binary outputs follow the JSON part."""
    try:
        asked = validate_params(request.parameters).binary_data_output
    except InputError as exc:
        raise InvalidInput(str(exc)) from None
    default_binary = binary_inputs if asked is None else asked
    wanted = {o.name: o for o in request.request_outputs or []}
    outputs: list[tuple[dict[str, Any], bytes | memoryview | None]] = []
    for out in response.outputs:
        if wanted and out.name not in wanted:
            continue
        req = wanted.get(out.name)
        binary = default_binary
        if req is not None and req.parameters and "binary_data" in req.parameters:
            binary = bool(validate_params(req.parameters).binary_data)
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        oparams = dict(out.parameters or {})
        raw = None
        if binary:
            raw = compat.raw_contents(out)
            if raw is None:
                raw = out.as_numpy().tobytes()
        elif out.datatype == "BYTES":
            entry["data"] = [base64.b64encode(bytes(b)).decode() for b in out.as_numpy().ravel()]
            oparams["content_encoding"] = "base64"
        elif out.datatype == "FP16":
            raise InvalidInput(f"output {out.name!r} is FP16: request it with binary_data")
        else:
            entry["data"] = out.as_numpy().ravel().tolist()
        if oparams:
            entry["parameters"] = oparams
        outputs.append((entry, raw))
    missing = set(wanted) - {o["name"] for o, _ in outputs}
    if missing:
        raise InvalidInput(f"unknown output(s) requested: {', '.join(sorted(missing))}")
    doc: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
    }
    if response.parameters:
        doc["parameters"] = dict(response.parameters)
    return encode_v2_body(doc, "outputs", outputs)


class PartsResponse(Response):
    """A response whose body is sent part after part, never joined (binary outputs)."""

    def __init__(self, parts: list[bytes | memoryview], headers: dict[str, str]):
        super().__init__(b"", 200, headers=headers)  # headers hold the parts' Content-Length
        self.parts = parts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Send the head, then each part (``more_body`` until the last)."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        for n, part in enumerate(self.parts):
            last = n == len(self.parts) - 1
            await send({"type": "http.response.body", "body": part, "more_body": not last})


class InflightBudget:
    """Request bytes a replica holds at once (REST bodies and gRPC messages together).

    When a request of at least :data:`model_server.memory.RELEASE_AFTER_BYTES` gives its bytes
    back, the process hands its free heap back to the system a moment later (once the
    request's objects, which the REST and gRPC layers hold until the answer is sent, are gone).
    """

    #: Seconds after a large request ends before its freed memory is handed back.
    RELEASE_DELAY_S = 1.0

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._release: asyncio.TimerHandle | None = None

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes; False (nothing reserved) when they do not fit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        """Release ``n`` reserved bytes (on the event loop)."""
        self.used -= n
        if n < memory.RELEASE_AFTER_BYTES or self._release is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop: nothing holds the request any more
            memory.release_free_memory()
            return
        self._release = loop.call_later(self.RELEASE_DELAY_S, self._released)

    def _released(self) -> None:
        self._release = None
        memory.release_free_memory()


#: Where :class:`BodyLimits` leaves the body it read, in the ASGI scope.
BODY_KEY = "medseg.body"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _Refused(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        drain: bool = False,
    ):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or []
        self.drain = drain  # read the rest of the body (discarded) before answering


async def refusal_response(
    request: Request, exc: Exception, limits: ServerLimits | None = None
) -> JSONResponse:
    """The answer to a request that kserve's own routes refuse (their exception handler).

    ``InvalidInput`` is a 400, ``ModelNotFound`` a 404, anything else (``ModelNotReady``) a 503
    with Retry-After; each is logged in one line, with no traceback.
    """
    status = (
        400 if isinstance(exc, InvalidInput) else 404 if isinstance(exc, ModelNotFound) else 503
    )
    log_refusal(status, f"{request.method} {request.url.path}", str(exc))
    retry = None
    if status == 503 and limits is not None:
        retry = {"Retry-After": str(limits.retry_after_s)}
    return JSONResponse(status_code=status, content={"error": str(exc)}, headers=retry)


def log_refusal(status: int, where: str, message: str) -> None:
    """The one log line of a refused request: JSON, the client's strings as values.

    No traceback (the client's error, not ours). Counting is done where the answer is sent
    (:class:`BodyLimits` for REST, the gRPC status interceptor).
    """
    logs.event(logger, logging.WARNING, "refused", status=status, where=where, reason=message)


class BodyLimits:
    """ASGI middleware around every REST request: admission, bounded bodies, counted errors.

    * At most ``max_connections`` requests at once; beyond it a 503 with Retry-After (uvicorn's
      own ``limit_concurrency`` is off: it answers a bare 503 that nobody counts).
    * Every body read within :class:`ServerLimits`, or refused. A request refused for the
      in-flight budget (503) has the rest of its body read and discarded first, within
      ``max_request_mb`` and the body timeouts, so that a client still uploading reads the
      503 instead of a connection reset.
    * Every error answer (4xx/5xx, and an exception that escapes the app: a 500) is counted in
      :data:`model_server.metrics.ERRORS` here, once, by its status.

    Args:
        app: The ASGI app.
        limits: The server's limits.
        budget: The replica's in-flight request bytes.
    """

    def __init__(self, app: Any, limits: ServerLimits, budget: InflightBudget):
        self.app = app
        self.limits = limits
        self.budget = budget
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Admit the request, read its body (bounded), then hand it to the app."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [0]

        async def counted(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if status[0] >= 400:
                    metrics.count_error(status[0])
            await send(message)

        self.active += 1
        try:
            await self._admitted(scope, receive, counted)
        except Exception:
            if not status[0]:
                metrics.count_error(500)  # Starlette answers it, outside this middleware
            raise
        finally:
            self.active -= 1

    async def _admitted(self, scope: Scope, receive: Receive, send: Send) -> None:
        where = f"{scope.get('method', '')} {scope.get('path', '')}"
        held = [0]
        try:
            if self.active > self.limits.max_connections:
                raise _Refused(
                    503,
                    f"the replica serves {self.active - 1} requests, max_connections="
                    f"{self.limits.max_connections}: retry later",
                    self._retry(),
                    drain=True,
                )
            if not _has_body(scope):
                await self.app(scope, receive, send)
                return
            body = await self._read(scope, receive, held)
        except _Refused as refused:
            self.budget.give(held[0])
            held[0] = 0
            if refused.drain and _has_body(scope) and not await self._drain(receive):
                metrics.count_error(refused.status)  # refused, though nobody reads the answer
                log_refusal(refused.status, where, refused.message + " (the client left)")
                return
            log_refusal(refused.status, where, refused.message)
            await _send_error(send, refused.status, refused.message, refused.headers)
            return
        if body is None:  # the client went away while sending
            self.budget.give(held[0])
            return
        scope[BODY_KEY] = body
        sent = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                if scope.get(BODY_KEY) is not None:  # not taken from the scope by our routes
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        try:
            await self.app(scope, replay, send)
        finally:
            scope.pop(BODY_KEY, None)
            self.budget.give(held[0])

    def _retry(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(self.limits.retry_after_s).encode())]

    async def _next(self, receive: Receive, ends: float) -> MutableMapping[str, Any]:
        """The next message of a body, within ``body_idle_s`` and before ``ends`` (loop time).

        Raises:
            TimeoutError: When neither came.
        """
        wait = min(self.limits.body_idle_s, ends - asyncio.get_running_loop().time())
        if wait <= 0:
            raise TimeoutError
        async with asyncio.timeout(wait):
            return await receive()

    async def _drain(self, receive: Receive) -> bool:
        """Read the rest of a refused body and discard it; False only if the client left.

        At most ``max_request_mb`` more bytes, within the body timeouts (a client that stalls
        gets the answer all the same): nothing is kept.
        """
        limits = self.limits
        ends = asyncio.get_running_loop().time() + limits.body_timeout_s
        read = 0
        while read <= limits.max_request_bytes:
            try:
                message = await self._next(receive, ends)
            except TimeoutError:
                return True
            if message["type"] == "http.disconnect":
                return False
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return True  # past the limit: answer now, the connection closes after it

    async def _read(self, scope: Scope, receive: Receive, held: list[int]) -> bytearray | None:
        limits = self.limits
        limit = limits.max_request_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        size = 0
        if declared is not None:
            if not declared.isdigit() or len(declared) > len(str(limit)):
                raise _Refused(400, f"Content-Length {declared[:40]!r} is not a number")
            size = int(declared)
            if size > limit:
                raise _Refused(
                    413,
                    f"request of {size} bytes exceeds the limit of {limit} "
                    f"(max_request_mb={limits.max_request_mb})",
                )
        busy = (
            f"the replica holds {self.budget.used} request bytes; this one would exceed "
            f"max_inflight_mb={limits.max_inflight_mb}: retry later"
        )
        if not self.budget.take(size):
            raise _Refused(503, busy, self._retry(), drain=True)
        held[0] = size
        body = bytearray()  # grows with what arrives (realloc: no copy of what is there)
        ends = asyncio.get_running_loop().time() + limits.body_timeout_s
        while True:
            try:
                message = await self._next(receive, ends)
            except TimeoutError:
                raise _Refused(
                    408,
                    f"request body incomplete after {len(body)} bytes (body_timeout_s="
                    f"{limits.body_timeout_s}, body_idle_s={limits.body_idle_s})",
                ) from None
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                raise _Refused(413, f"request exceeds the limit of {limit} bytes (max_request_mb)")
            if len(body) > held[0]:
                if not self.budget.take(len(body) - held[0]):
                    del body[:]  # nothing of it is kept while the rest is drained
                    raise _Refused(503, busy, self._retry(), drain=True)
                held[0] = len(body)
            if not message.get("more_body", False):
                return body


def _has_body(scope: Scope) -> bool:
    return scope.get("method") in _BODY_METHODS


async def _send_error(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    content = orjson.dumps({"error": message})
    start = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
        (b"connection", b"close"),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": content})


async def _watch_disconnect(receive: Receive, ticket: Ticket) -> None:
    """Abandon the ticket when the client disconnects."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            ticket.abandon("the client disconnected")
            return


def install(
    app: FastAPI, dataplane: DataPlane, limits: ServerLimits, budget: InflightBudget
) -> None:
    """Add :class:`BodyLimits` and the v2/v1 infer routes to ``app`` (before the server starts)."""
    app.add_middleware(BodyLimits, limits=limits, budget=budget)
    routes = _Routes(dataplane, limits)
    for action in ("load", "unload"):
        app.add_api_route(
            f"/v2/repository/models/{{model_name}}/{action}", routes.repository, methods=["POST"]
        )
    paths = ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{v}/infer")
    for path in paths:
        app.add_api_route(path, routes.infer, methods=["POST"], include_in_schema="{v}" not in path)
    app.add_api_route("/v1/models/{model_name}:predict", routes.predict_v1, methods=["POST"])
    dicom_route.install(app, dataplane, limits, routes.serve)


class _Routes:
    """The REST routes that :func:`install` adds, over kserve's data plane."""

    def __init__(self, dataplane: DataPlane, limits: ServerLimits):
        self.dataplane = dataplane
        self.limits = limits

    async def serve(
        self,
        request: Request,
        model_name: str,
        handle: Callable[[bytearray], Awaitable[Response]],
    ) -> Response:
        """``handle`` the body that :class:`BodyLimits` read, under the request's ticket.

        The client's disconnect abandons the ticket; a refusal is a 4xx with one log line.
        """
        where = f"{request.method} {request.url.path}"
        body = request.scope.pop(BODY_KEY, None) or bytearray()  # read by BodyLimits
        metrics.REQUEST_BYTES.observe(len(body))
        ticket = Ticket(self.limits.request_timeout_s)
        token = current_ticket.set(ticket)
        watcher = asyncio.create_task(_watch_disconnect(request.receive, ticket))
        started = time.monotonic()
        try:
            if not await self.dataplane.model_ready(model_name, True):
                raise ModelNotReady(model_name)
            return await handle(body)
        except InvalidInput as exc:
            log_refusal(400, where, str(exc))
            return _error(400, str(exc))
        except RequestAbandoned as exc:
            status = 504 if exc.deadline else 499
            log_refusal(status, where, f"{exc.reason} after {time.monotonic() - started:.1f} s")
            return _error(status, exc.reason)
        finally:
            watcher.cancel()
            current_ticket.reset(token)

    async def infer(self, request: Request, model_name: str, v: str | None = None) -> Response:
        """``POST /v2/models/{name}[/versions/{v}]/infer``: binary inputs viewed, not copied."""

        async def handle(body: bytearray) -> Response:
            header = request.headers.get(HEADER_LENGTH)
            length = json_length(header, len(body))
            parsed = parse_request(body, length, model_name, self.limits)
            headers = {k.lower(): v for k, v in request.headers.items()}
            result, response_headers = await self.dataplane.infer(model_name, parsed, headers)
            if not isinstance(result, InferResponse):
                raise InvalidInput("the model did not answer a v2 response")
            parts, out_headers = encode_response(result, parsed, binary_inputs=header is not None)
            return PartsResponse(parts, {**_passed_on(response_headers), **out_headers})

        return await self.serve(request, model_name, handle)

    async def predict_v1(self, request: Request, model_name: str) -> Response:
        """``POST /v1/models/{name}:predict``: a v1 JSON body, parsed within the limits."""

        async def handle(body: bytearray) -> Response:
            if not body:
                raise InvalidInput("empty request body")
            doc = load_json(body, self.limits)
            if not isinstance(doc, dict):
                raise InvalidInput("a v1 request must be a JSON object")
            headers = {k.lower(): v for k, v in request.headers.items()}
            result, response_headers = await self.dataplane.infer(model_name, doc, headers)
            named = _passed_on(response_headers)
            return Response(orjson.dumps(result), 200, named, media_type="application/json")

        return await self.serve(request, model_name, handle)

    async def repository(self, request: Request, model_name: str) -> Response:
        """The model repository's load/unload: refused (:class:`RepositoryDisabled`)."""
        refused = RepositoryDisabled()
        log_refusal(403, f"{request.method} {request.url.path}", str(refused))
        return _error(403, str(refused))


def _passed_on(response_headers: Mapping[str, str] | None) -> dict[str, str]:
    """The model's response headers, less those the route sets itself (length and type)."""
    return {
        k: v
        for k, v in (response_headers or {}).items()
        if k.lower() not in ("content-length", "content-type")
    }
