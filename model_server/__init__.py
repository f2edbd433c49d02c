"""The medseg KServe model server: a custom predictor behind kserve's ModelServer.

:mod:`model_server.predictor` holds the ``kserve.Model`` (its request protocol in
:mod:`model_server.protocol` and :mod:`model_server.classifier`, its slots and tickets in
:mod:`model_server.admission`); :mod:`model_server.rest` the binary REST fast path installed into
kserve's own FastAPI app; :mod:`model_server.grpc_service` the gRPC servicer;
:mod:`model_server.kserve_server` kserve's ModelServer, bound and drained; ``python -m
model_server`` (and ``medseg serve``) start it with both REST and gRPC. :mod:`model_server.compat`
is the one door to kserve's private parts.
"""
