"""Every use of kserve's server internals, behind a version guard.

kserve's ``ModelServer`` binds REST to ``0.0.0.0`` and gRPC to ``[::]`` with no option, logs every
400 with a full traceback, and turns any exception in its gRPC request conversion into INTERNAL.
This module keeps kserve's server (its app, dataplane, model repository, servicer, interceptors)
and changes only that:

* :class:`MedsegModelServer` starts REST and gRPC on :attr:`ServerLimits.host`, with the gRPC
  call cap of :class:`~medseg.settings.ServerLimits` and without uvicorn's ``limit_concurrency``
  (a bare 503 that nobody counts: :class:`~model_server.rest.BodyLimits` admits requests);
* every log record of the process is one line (:func:`model_server.logs.install`);
* a bad request (``InvalidInput``, unknown model) is answered as kserve does, logged in one line;
* the model repository extension (load/unload over REST and gRPC) is refused, 403 and
  PERMISSION_DENIED: a single-model predictor needs none of it, and kserve lets any client
  unload the model;
* readiness (REST ``/v2/health/ready``, gRPC ``ServerReady``) is that of the served model, not
  kserve's constant True;
* SIGTERM (and SIGINT) drains REST and gRPC together: both stop taking new requests at once
  (the listening sockets close; gRPC answers UNAVAILABLE), the requests in flight have
  :attr:`~medseg.settings.ServerLimits.drain_s` to finish, then the model is unloaded and the
  process exits, within the pod's ``terminationGracePeriodSeconds``
  (:attr:`~medseg.settings.ServerLimits.grace_period_s`). kserve's own handling let uvicorn take
  the signal alone: gRPC kept taking new calls while REST drained, started its own drain only
  after REST's (two grace periods in a row), REST used kserve's fixed 30 s, and the model was
  unloaded while gRPC calls were still in flight;
* gRPC ``ModelInfer`` counts its message in the in-flight budget, gives the request a
  :class:`~model_server.predictor.Ticket` (the call's deadline; its cancellation stops the work)
  and answers a malformed message with INVALID_ARGUMENT;
* gRPC ``ModelInfer`` parses its message without copying the tensors: kserve's generated
  handler parses the whole ``ModelInferRequest`` with protobuf, whose Python objects copy
  ``raw_input_contents`` on every access (and ``ByteSize`` serialises the message again); here
  the tensors stay views into the received bytes (:func:`~medseg.codec.split_grpc_raw`), and
  only the small rest is a protobuf message. See ``benchmarks/bench_serving.py`` part A.

It relies on private parts of kserve (``ModelServer._serve`` and
``_register_and_check_atleast_one_model_is_ready``, ``RESTServer.config`` and ``_server`` (a
``_RefreshingServer``, uvicorn's ``Server``), ``GRPCServer._port``,
``InferInput._raw_data``/``_data``, read and set only through :func:`raw_contents` and
:func:`set_contents`, which the predictor and the REST route call):
:data:`KSERVE_TESTED` names the versions it was written against, and importing it under another
kserve fails with a message instead of misbehaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time
from collections.abc import Iterator
from concurrent import futures
from importlib import metadata
from typing import Any

from medseg.codec import split_grpc_raw
from medseg.kserve_import import clean_argv
from medseg.settings import ServerLimits

__all__ = [
    "KSERVE_TESTED",
    "MedsegModelServer",
    "listen_address",
    "raw_contents",
    "set_contents",
]

#: kserve versions (major.minor) whose internals this module was written against.
KSERVE_TESTED = ("0.21",)

_version = metadata.version("kserve")
if ".".join(_version.split(".")[:2]) not in KSERVE_TESTED:
    raise ImportError(
        f"model_server.compat was written against kserve {', '.join(KSERVE_TESTED)}; "
        f"kserve {_version} is installed: check its ModelServer/RESTServer/GRPCServer internals"
    )

with clean_argv():  # kserve parses sys.argv on import
    import grpc
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from grpc import aio
    from kserve import ModelServer
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
    from kserve.logging import logger
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.infer_type import InferRequest, InferResponse
    from kserve.protocol.rest.server import RESTServer, _RefreshingServer
    from kserve.utils.utils import to_headers

from model_server import logs, metrics  # noqa: E402
from model_server.predictor import (  # noqa: E402
    RequestAbandoned,
    Ticket,
    current_ticket,
    plain_params,
)
from model_server.rest import (  # noqa: E402
    InflightBudget,
    RepositoryDisabled,
    check_request_strings,
    log_refusal,
)

_ALL_INTERFACES = ("0.0.0.0", "::", "")


def listen_address(host: str, port: int) -> str:
    """The gRPC listen address for ``host``: ``[::]`` (IPv4 and IPv6) for all interfaces."""
    if host in _ALL_INTERFACES:
        return f"[::]:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _one_line(
    request: Request, exc: Exception, limits: ServerLimits | None = None
) -> JSONResponse:
    status = (
        400 if isinstance(exc, InvalidInput) else 404 if isinstance(exc, ModelNotFound) else 503
    )
    log_refusal(status, f"{request.method} {request.url.path}", str(exc))
    retry = None
    if status == 503 and limits is not None:
        retry = {"Retry-After": str(limits.retry_after_s)}
    return JSONResponse(status_code=status, content={"error": str(exc)}, headers=retry)


def raw_contents(tensor: Any) -> Any | None:
    """A kserve ``InferInput``/``InferOutput``'s binary contents, or None when it holds values.

    Binary contents are what the REST binary extension and gRPC's raw contents carry: a buffer of
    the tensor's bytes (kserve keeps it privately in ``_raw_data``).
    """
    return getattr(tensor, "_raw_data", None)


def set_contents(inp: Any, *, raw: Any | None = None, data: Any | None = None) -> None:
    """Give a kserve ``InferInput`` its contents without a copy: a buffer (``raw``) or an array.

    kserve's public ``set_data_from_numpy`` copies the array into bytes; a 136 MiB tensor stays a
    view here.
    """
    if (raw is None) == (data is None):
        raise ValueError("set_contents takes exactly one of raw and data")
    if raw is not None:
        inp._raw_data = raw
    else:
        inp._data = data


class _Busy(Exception):
    """The in-flight budget is spent: the client should retry later."""


class _DataPlane(DataPlane):
    """kserve's ``DataPlane``, ready only when every served model can answer.

    kserve's ``ready`` answers True whatever its models' state.
    """

    async def ready(self) -> bool:
        """True when the server is up and each of its models is ready."""
        if not await super().ready():
            return False
        registry = self.model_registry
        names = list(registry.get_models())
        return bool(names) and all([await registry.is_model_ready(n) for n in names])


class _Uvicorn(_RefreshingServer):
    """kserve's uvicorn server, leaving SIGTERM and SIGINT to :class:`MedsegModelServer`.

    uvicorn installs its own handlers while it serves: it would take the signal alone and drain
    REST while gRPC went on taking calls.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install nothing: :meth:`MedsegModelServer.drain` sets ``should_exit``."""
        yield


class _RESTServer(RESTServer):
    def __init__(self, *args: Any, limits: ServerLimits, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._limits = limits
        self.config.host = limits.host
        self.config.limit_concurrency = None  # BodyLimits admits max_connections, counted
        self._server = _Uvicorn(self.config)

    def stop_accepting(self) -> None:
        """Close the listening socket; requests in flight get ``timeout_graceful_shutdown``."""
        self._server.should_exit = True

    def _add_exception_handlers(self, app: Any) -> None:
        super()._add_exception_handlers(app)
        for kind in (InvalidInput, ModelNotFound, ModelNotReady):
            app.add_exception_handler(kind, functools.partial(_one_line, limits=self._limits))


class _ExceptionToStatus(ExceptionToStatusInterceptor):
    """Each exception of a call as its gRPC status, logged in one line and counted once."""

    def __init__(self, limits: ServerLimits):
        super().__init__()
        self._limits = limits

    async def handle_exception(
        self, ex: Exception, request_or_iterator: Any, context: Any, method_name: str
    ) -> None:
        metrics.count_error(_status_of(ex))
        _forget_frames(ex)
        if isinstance(ex, InvalidInput):
            log_refusal(400, method_name, str(ex))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(ex))
        elif isinstance(ex, RequestAbandoned):
            log_refusal(504 if ex.deadline else 499, method_name, ex.reason)
            code = grpc.StatusCode.DEADLINE_EXCEEDED if ex.deadline else grpc.StatusCode.CANCELLED
            await context.abort(code, ex.reason)
        elif isinstance(ex, _Busy):
            log_refusal(503, method_name, str(ex))
            context.set_trailing_metadata((("retry-after", str(self._limits.retry_after_s)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(ex))
        elif isinstance(ex, RepositoryDisabled):
            log_refusal(403, method_name, str(ex))
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(ex))
        elif isinstance(ex, ModelNotFound):
            log_refusal(404, method_name, str(ex))
            await context.abort(grpc.StatusCode.NOT_FOUND, str(ex))
        else:
            await super().handle_exception(ex, request_or_iterator, context, method_name)


def _forget_frames(ex: BaseException) -> None:
    """Drop the tracebacks of ``ex`` and of the exceptions chained to it.

    grpc keeps the exception of an aborted call (chained to its ``AbortError``) after the call;
    its traceback would keep every frame of the request alive, and with them the request's
    message: a refused 200 MB message stayed resident, one more for each such call.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [ex]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        stack += [current.__context__, current.__cause__]


def _status_of(ex: Exception) -> int:
    """The REST status of a gRPC call's exception, for :func:`metrics.count_error`."""
    if isinstance(ex, InvalidInput):
        return 400
    if isinstance(ex, RequestAbandoned):
        return 504 if ex.deadline else 499
    if isinstance(ex, _Busy | ModelNotReady):
        return 503
    if isinstance(ex, RepositoryDisabled):
        return 403
    if isinstance(ex, ModelNotFound):
        return 404
    return 500


#: ``ModelInferRequest.raw_input_contents``'s field number.
_RAW_INPUT_FIELD = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class _Received:
    """A received ``ModelInferRequest``: its small part parsed, its tensors viewed in the message.

    A message that does not parse keeps its error, raised as INVALID_ARGUMENT by the servicer
    (an exception in a deserializer would be answered INTERNAL by grpc).
    """

    def __init__(self, message: bytes):
        self.size = len(message)
        self.error: str | None = None
        self.raws: list[memoryview] = []
        try:
            head, self.raws = split_grpc_raw(message, _RAW_INPUT_FIELD, "ModelInferRequest")
            self.request = pb.ModelInferRequest.FromString(head)
        except Exception as exc:  # protobuf's DecodeError, or our InputError
            self.error = f"malformed ModelInferRequest: {exc}"
            self.request = pb.ModelInferRequest()

    def release(self) -> None:
        """Let go of the message (the tensors' views and the parsed rest) once answered.

        grpc may hold this object past the call (with a refused call's exception): what it
        holds then is empty.
        """
        self.raws = []
        self.request = pb.ModelInferRequest()


def _infer_request(received: _Received, limits: ServerLimits) -> InferRequest:
    """The kserve ``InferRequest`` of a received message, the tensors as views (no copy).

    Its model name, id, tensor names and parameters are bounded first (``max_param_chars``).
    """
    if received.error is not None:
        raise InvalidInput(received.error)
    request = received.request
    check_request_strings(
        {
            "id": request.id,
            "parameters": plain_params(request.parameters),
            "inputs": [_spec(i) for i in request.inputs],
            "outputs": [_spec(o) for o in request.outputs],
        },
        limits,
    )
    if received.raws:  # kserve's validate_grpc_request, on the tensors we kept aside
        if len(received.raws) != len(request.inputs):
            raise InvalidInput(
                f"the number of inputs ({len(request.inputs)}) does not match the number of "
                f"raw_input_contents ({len(received.raws)})"
            )
        named = [i.name for i in request.inputs if i.HasField("contents")]
        if named:
            raise InvalidInput(
                f"contents must not be given with raw_input_contents (input {named[0]!r})"
            )
    try:
        infer_request = InferRequest.from_grpc(request)
    except Exception as exc:  # kserve's conversion of a hostile message
        raise InvalidInput(f"malformed ModelInferRequest: {exc}") from None
    if received.raws:
        for inp, raw in zip(infer_request.inputs, received.raws, strict=True):
            set_contents(inp, raw=raw)  # as_numpy() is np.frombuffer on this view
        infer_request._use_raw_outputs = True  # raw inputs: raw outputs (kserve's rule)
    return infer_request


def _spec(tensor: Any) -> dict[str, Any]:
    """A gRPC tensor's name, datatype and parameters, as plain values."""
    return {
        "name": tensor.name,
        "datatype": getattr(tensor, "datatype", ""),
        "parameters": plain_params(tensor.parameters),
    }


class _Servicer(InferenceServicer):
    def __init__(self, *args: Any, limits: ServerLimits, budget: InflightBudget):
        super().__init__(*args)
        self._limits = limits
        self._budget = budget

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        """Refused: the model repository extension is off (:class:`RepositoryDisabled`)."""
        raise RepositoryDisabled()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        """Refused: the model repository extension is off (:class:`RepositoryDisabled`)."""
        raise RepositoryDisabled()

    async def ModelInfer(self, received: _Received, context: Any) -> Any:
        """The kserve ``ModelInfer`` on a :class:`_Received` message, bounded and cancellable."""
        request = received.request
        size = received.size
        if not self._budget.take(size):
            message = (
                f"the replica holds {self._budget.used} request bytes; this call would exceed "
                f"max_inflight_mb={self._limits.max_inflight_mb}: retry later"
            )
            raise _Busy(message)
        metrics.REQUEST_BYTES.observe(size)
        remaining = context.time_remaining()
        timeout = self._limits.request_timeout_s
        ticket = Ticket(timeout if remaining is None else min(timeout, remaining))
        token = current_ticket.set(ticket)
        started = time.monotonic()
        try:
            if len(request.model_name) > self._limits.max_param_chars:
                raise InvalidInput(
                    f"model_name holds {len(request.model_name)} characters, above "
                    f"max_param_chars={self._limits.max_param_chars}"
                )
            infer_request = _infer_request(received, self._limits)
            response, _ = await self._data_plane.infer(
                request=infer_request, headers=to_headers(context), model_name=request.model_name
            )
            if isinstance(response, InferResponse):
                return response.to_grpc()
            return response
        except asyncio.CancelledError:
            ticket.abandon(f"the call was cancelled after {time.monotonic() - started:.1f} s")
            raise
        finally:
            current_ticket.reset(token)
            received.release()
            self._budget.give(size)


class _Handlers:
    """Stands in for a server to receive the generated code's method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the same handlers come by name below."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Keep the handlers by method name."""
        self.handlers.update(handlers)


def _add_servicer(servicer: _Servicer, server: Any) -> None:
    """The kserve method handlers on ``server``; ``ModelInfer`` receives a :class:`_Received`."""
    captured = _Handlers()
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, captured)
    handlers = dict(captured.handlers)
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=_Received,
        response_serializer=pb.ModelInferResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_registered_method_handlers(_SERVICE, handlers)


class _GRPCServer(GRPCServer):
    def __init__(self, *args: Any, limits: ServerLimits, budget: InflightBudget, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._budget = budget

    async def start(self, max_workers: int) -> None:
        servicer = _Servicer(
            self._data_plane,
            self._model_repository_extension,
            limits=self._limits,
            budget=self._budget,
        )
        size = self._limits.max_request_bytes
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), _ExceptionToStatus(self._limits)),
            options=[
                ("grpc.max_send_message_length", size),
                ("grpc.max_receive_message_length", size),
            ],
            maximum_concurrent_rpcs=self._limits.grpc_concurrent_calls,
        )
        _add_servicer(servicer, self._server)
        address = listen_address(self._limits.host, self._port)
        self._server.add_insecure_port(address)
        logger.info("Starting gRPC server on %s", address)
        await self._server.start()
        await self._server.wait_for_termination()

    async def stop(self, sig: int | None = None) -> None:
        """Refuse new calls at once; those in flight get the grace period, then are cancelled."""
        if self._server is not None:
            await self._server.stop(grace=self._grace_period)


class MedsegModelServer(ModelServer):
    """kserve's ``ModelServer`` (one REST process and gRPC), bound and capped by ``limits``.

    Args:
        limits: Host, message limits and caps.
        budget: The in-flight request bytes that REST and gRPC share.
        kwargs: ``ModelServer``'s own arguments (ports, ``enable_grpc``).
    """

    def __init__(self, limits: ServerLimits, budget: InflightBudget, **kwargs: Any):
        # workers=1: the fast REST routes live in this process's app
        super().__init__(workers=1, grace_period=limits.drain_s, **kwargs)
        logs.install()
        self.dataplane = _DataPlane(model_registry=self.registered_models)
        self.limits = limits
        self.budget = budget
        self._draining = False
        self._stopping: asyncio.Future[None] | None = None  # gRPC's drain, once signalled

    def start(self, models: list[Any]) -> None:
        """Serve ``models`` until SIGTERM/SIGINT (kserve's ``start``, one REST process)."""
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = _RESTServer(
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            access_log_format=self.access_log_format,
            workers=1,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
            limits=self.limits,
        )
        logger.info("REST on %s:%d", self.limits.host, self.http_port)
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            self._grpc_server = _GRPCServer(
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                kwargs={},
                grace_period=self.grace_period,
                limits=self.limits,
                budget=self.budget,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        asyncio.run(self._serve())

    def register_signal_handler(self) -> None:
        """Nothing here: :meth:`_serve` installs :meth:`drain` on its running loop."""

    async def _serve(self) -> None:
        """Run REST and gRPC until both have drained, then unload the models."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.drain, sig)
        await asyncio.gather(*self.servers)
        for name in list(self.registered_models.get_models()):
            self.registered_models.unload(name)
        logger.info("Drained and stopped")

    def drain(self, sig: int) -> None:
        """Stop taking requests on REST and gRPC at once; those in flight may finish.

        Args:
            sig: The signal that asked for it (a second one is only logged).
        """
        name = signal.Signals(sig).name
        if self._draining:
            logger.info("%s while draining: the drain goes on", name)
            return
        self._draining = True
        logger.info(
            "%s: refusing new requests; those in flight have %d s to finish",
            name,
            self.limits.drain_s,
        )
        if self._rest_server is not None:
            self._rest_server.stop_accepting()
        if self._grpc_server is not None:
            self._stopping = asyncio.ensure_future(self._grpc_server.stop(sig))

    def stop(self, sig: int) -> None:
        """The same drain, for callers of kserve's ``ModelServer.stop``."""
        self.drain(sig)
