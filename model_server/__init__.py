"""The medseg KServe model server: a custom predictor behind kserve's ModelServer.

:mod:`model_server.predictor` holds the ``kserve.Model``; :mod:`model_server.rest` the binary
REST fast path installed into kserve's own FastAPI app; ``python -m model_server`` (and
``medseg serve``) start kserve's ModelServer with both REST and gRPC.
"""
