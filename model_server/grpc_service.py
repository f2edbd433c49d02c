"""kserve's gRPC server, bound, bounded and cancellable.

What :class:`MedsegGRPCServer` changes in kserve's (through :mod:`model_server.compat`):

* it listens on :attr:`~medseg.core.settings.ServerLimits.host` (kserve binds ``[::]``), with the
  message limits and the call cap of :class:`~medseg.core.settings.ServerLimits`;
* ``ModelInfer`` counts its message in the in-flight budget
  (:class:`~model_server.rest.InflightBudget`, shared with REST), gives the request a
  :class:`~model_server.admission.Ticket` (the call's deadline; its cancellation stops the work)
  and answers a malformed message with INVALID_ARGUMENT (kserve: INTERNAL);
* ``ModelInfer`` parses its message without copying the tensors: kserve's generated handler
  parses the whole ``ModelInferRequest`` with protobuf, whose Python objects copy
  ``raw_input_contents`` on every access (and ``ByteSize`` serialises the message again); here
  the tensors stay views into the received bytes (:func:`~medseg.serving.codec.split_grpc_raw`), and
  only the small rest is a protobuf message. See ``benchmarks/bench_serving.py`` part A;
* every exception of a call becomes its status, logged in one line and counted once; the model
  repository extension is refused (PERMISSION_DENIED);
* :meth:`MedsegGRPCServer.stop` refuses new calls at once and gives those in flight the grace
  period (:meth:`model_server.kserve_server.MedsegModelServer.drain`).
"""

from __future__ import annotations

import asyncio
import time
from concurrent import futures
from typing import Any

import grpc
from grpc import aio

from medseg.core.settings import ServerLimits
from medseg.serving.codec import split_grpc_raw
from model_server import metrics
from model_server.admission import RequestAbandoned, Ticket, current_ticket
from model_server.compat import (
    ExceptionToStatusInterceptor,
    GRPCServer,
    InferenceServicer,
    InferRequest,
    InferResponse,
    InvalidInput,
    LoggingInterceptor,
    ModelNotFound,
    ModelNotReady,
    grpc_predict_v2_pb2_grpc,
    logger,
    pb,
    set_contents,
    to_headers,
    use_raw_outputs,
)
from model_server.protocol import plain_params
from model_server.rest import (
    InflightBudget,
    RepositoryDisabled,
    check_request_strings,
    log_refusal,
)

__all__ = ["MedsegGRPCServer", "listen_address"]

_ALL_INTERFACES = ("0.0.0.0", "::", "")


def listen_address(host: str, port: int) -> str:
    """The gRPC listen address for ``host``: ``[::]`` (IPv4 and IPv6) for all interfaces."""
    if host in _ALL_INTERFACES:
        return f"[::]:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Busy(Exception):
    """The in-flight budget is spent: the client should retry later."""


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
        use_raw_outputs(infer_request)  # raw inputs: raw outputs (kserve's rule)
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


class MedsegGRPCServer(GRPCServer):
    """kserve's ``GRPCServer`` on ``limits.host``, bounded by ``limits`` and ``budget``."""

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
