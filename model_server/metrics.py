"""The server's own Prometheus metrics, beside kserve's (one registry, kserve's ``/metrics``).

kserve already exposes ``request_preprocess_seconds``, ``request_predict_seconds`` and
``request_postprocess_seconds`` (per model, wall time of each stage including a wait for a
slot). These add what an operator of a segmentation server needs besides:

``medseg_stage_seconds{stage}``
    The work of each stage alone: ``decode``, ``segment``, ``encode``.
``medseg_request_bytes``
    Size of each request body (REST) or message (gRPC) that was read whole.
``medseg_case_voxels``
    Voxels of each decoded case, all channels.
``medseg_inflight_requests``
    Requests inside the model (from validation to the encoded answer).
``medseg_request_errors_total{class}``
    Refused or failed requests, by class (:data:`ERROR_CLASSES`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "CASE_VOXELS",
    "ERRORS",
    "ERROR_CLASSES",
    "INFLIGHT",
    "REQUEST_BYTES",
    "STAGE_SECONDS",
    "count_error",
    "stage",
]

_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320, 640)
_BYTES = tuple(float(4**k * 1024) for k in range(11))  # 1 KiB … 1 GiB
_VOXELS = tuple(float(4**k * 4096) for k in range(11))  # 4 Ki … 4 Gi

STAGE_SECONDS = Histogram(
    "medseg_stage_seconds",
    "Seconds of work in each serving stage (decode, segment, encode), without waiting",
    ["stage"],
    buckets=_SECONDS,
)
REQUEST_BYTES = Histogram(
    "medseg_request_bytes",
    "Bytes of each request read whole (REST body, gRPC message)",
    buckets=_BYTES,
)
CASE_VOXELS = Histogram(
    "medseg_case_voxels", "Voxels of each decoded case (all channels)", buckets=_VOXELS
)
INFLIGHT = Gauge("medseg_inflight_requests", "Requests inside the model (validate to encode)")
ERRORS = Counter("medseg_request_errors", "Refused or failed requests, by class", ["class"])

#: The error class of each answer status (REST status; gRPC codes are mapped to these).
ERROR_CLASSES = {
    400: "invalid_input",
    404: "unknown_model",
    408: "body_timeout",
    413: "too_large",
    499: "client_gone",
    500: "internal",
    503: "busy",
    504: "deadline",
}


def count_error(status: int) -> None:
    """Count one refused or failed request by the status it was answered with."""
    ERRORS.labels(ERROR_CLASSES.get(status, "internal" if status >= 500 else "other")).inc()


@dataclass
class StageTimer:
    """The seconds a :func:`stage` took (set when it ends)."""

    seconds: float = 0.0


@contextmanager
def stage(name: str) -> Iterator[StageTimer]:
    """Time the work of one stage into :data:`STAGE_SECONDS` (also when it fails)."""
    timer = StageTimer()
    started = time.perf_counter()
    try:
        yield timer
    finally:
        timer.seconds = time.perf_counter() - started
        STAGE_SECONDS.labels(name).observe(timer.seconds)
