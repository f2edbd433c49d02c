"""kserve, imported once under a version guard, and the one door to its private parts.

Every module of :mod:`model_server` that builds on kserve's server internals imports kserve's
names from here: :mod:`model_server.kserve_server` (``ModelServer._serve`` and
``_register_and_check_atleast_one_model_is_ready``, ``RESTServer.config`` and ``_server``, a
``_RefreshingServer``, uvicorn's ``Server``) and :mod:`model_server.grpc_service`
(``GRPCServer._port``, ``_server`` and ``_grace_period``, the generated servicer's handlers).
The private fields of kserve's tensors (``InferInput._raw_data``/``_data``, and
``InferRequest._use_raw_outputs``) are read and set only through :func:`raw_contents`,
:func:`values`, :func:`set_contents` and :func:`use_raw_outputs`, which the predictor, the REST
route and the gRPC servicer call.

:data:`KSERVE_TESTED` names the versions this was written against: importing it under another
kserve fails with a message instead of misbehaving. kserve parses ``sys.argv`` on import
(:mod:`medseg.serving.kserve_import`): it is imported here with a clean one.

A leaf: it imports kserve and nothing of :mod:`model_server` (an import-linter contract in
``pyproject.toml`` keeps it so).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from medseg.serving.kserve_import import clean_argv

__all__ = [
    "FASTAPI_APP_IMPORT_STRING",
    "KSERVE_TESTED",
    "DataPlane",
    "ExceptionToStatusInterceptor",
    "GRPCServer",
    "InferRequest",
    "InferResponse",
    "InferenceServicer",
    "InvalidInput",
    "LoggingInterceptor",
    "ModelNotFound",
    "ModelNotReady",
    "ModelServer",
    "RESTServer",
    "RefreshingServer",
    "grpc_predict_v2_pb2_grpc",
    "logger",
    "pb",
    "raw_contents",
    "set_contents",
    "to_headers",
    "use_raw_outputs",
    "values",
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
    from kserve.protocol.rest.server import RESTServer
    from kserve.protocol.rest.server import _RefreshingServer as RefreshingServer
    from kserve.utils.utils import to_headers


def raw_contents(tensor: Any) -> Any | None:
    """A kserve ``InferInput``/``InferOutput``'s binary contents, or None when it holds values.

    Binary contents are what the REST binary extension and gRPC's raw contents carry: a buffer of
    the tensor's bytes (kserve keeps it privately in ``_raw_data``).
    """
    return getattr(tensor, "_raw_data", None)


def values(tensor: Any) -> Any | None:
    """The values a kserve ``InferInput`` holds (kserve keeps them in ``_data``), or None."""
    return getattr(tensor, "_data", None)


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


def use_raw_outputs(request: Any) -> None:
    """Have a kserve ``InferRequest`` answered with raw outputs (kserve's rule for raw inputs)."""
    request._use_raw_outputs = True
