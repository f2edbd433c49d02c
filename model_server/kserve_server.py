"""kserve's ``ModelServer``, bound, capped and drained as one process of REST and gRPC.

kserve's ``ModelServer`` binds REST to ``0.0.0.0`` and gRPC to ``[::]`` with no option, logs every
400 with a full traceback, and lets uvicorn take SIGTERM alone. :class:`MedsegModelServer` keeps
kserve's server (its app, dataplane, model repository, servicer, interceptors; through
:mod:`model_server.compat`) and changes only that:

* it starts REST and gRPC (:class:`~model_server.grpc_service.MedsegGRPCServer`) on
  :attr:`ServerLimits.host`, without uvicorn's ``limit_concurrency`` (a bare 503 that nobody
  counts: :class:`~model_server.rest.BodyLimits` admits requests);
* every log record of the process is one line (:func:`model_server.logs.install`);
* a bad request (``InvalidInput``, unknown model) is answered as kserve does, logged in one line
  (:func:`model_server.rest.refusal_response`);
* the model repository extension (load/unload over REST and gRPC) is refused, 403 and
  PERMISSION_DENIED: a single-model predictor needs none of it, and kserve lets any client
  unload the model;
* readiness (REST ``/v2/health/ready``, gRPC ``ServerReady``) is that of the served model, not
  kserve's constant True;
* SIGTERM (and SIGINT) drains REST and gRPC together: both stop taking new requests at once
  (the listening sockets close; gRPC answers UNAVAILABLE), the requests in flight have
  :attr:`~medseg.core.settings.ServerLimits.drain_s` to finish, then the model is unloaded and the
  process exits, within the pod's ``terminationGracePeriodSeconds``
  (:attr:`~medseg.core.settings.ServerLimits.grace_period_s`). kserve's own handling let uvicorn
  take the signal alone: gRPC kept taking new calls while REST drained, started its own drain only
  after REST's (two grace periods in a row), REST used kserve's fixed 30 s, and the model was
  unloaded while gRPC calls were still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import Iterator
from typing import Any

from medseg.core.settings import ServerLimits
from model_server import logs
from model_server.compat import (
    FASTAPI_APP_IMPORT_STRING,
    DataPlane,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ModelServer,
    RefreshingServer,
    RESTServer,
    logger,
)
from model_server.grpc_service import MedsegGRPCServer
from model_server.rest import InflightBudget, refusal_response

__all__ = ["MedsegModelServer"]


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


class _Uvicorn(RefreshingServer):
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
            app.add_exception_handler(
                kind, functools.partial(refusal_response, limits=self._limits)
            )


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
            self._grpc_server = MedsegGRPCServer(
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
