"""Start kserve's ModelServer (REST and gRPC) with the medseg predictor.

``python -m model_server --model_dir /mnt/models`` is the container's entrypoint; ``medseg serve``
calls :func:`serve`. All of kserve's own flags (``--http_port``, ``--grpc_port``, …) are accepted;
ours are ``--model_dir``, ``--model_name``, and overrides of
:class:`~medseg.core.settings.ServerLimits` (whose other fields come from ``MEDSEG_SERVER_*``
variables): ``--host`` (loopback by default; the server image sets ``MEDSEG_SERVER_HOST=0.0.0.0``),
``--max_request_mb`` (also the gRPC message limits, which kserve leaves at 8 MiB otherwise) and
``--max_concurrency``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from medseg.core.settings import DEFAULT_SERVED_NAME, KSERVE_MODEL_DIR, ServerLimits
from medseg.serving.kserve_import import clean_argv
from model_server.memory import limit_malloc_arenas

__all__ = ["limits_from_args", "parse_args", "serve"]

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Kserve's flags plus ours."""
    from kserve.model_server import parser as kserve_parser

    parser = argparse.ArgumentParser(parents=[kserve_parser], conflict_handler="resolve")
    parser.add_argument(
        "--model_dir",
        default=os.environ.get("MEDSEG_MODEL_DIR", KSERVE_MODEL_DIR),
        help="Folder or s3:// prefix with model.yaml and model.pt.",
    )
    parser.add_argument(
        "--model_name", default=os.environ.get("MEDSEG_MODEL_NAME", DEFAULT_SERVED_NAME)
    )
    parser.add_argument("--host", default=None, help="Interface to bind (MEDSEG_SERVER_HOST).")
    parser.add_argument("--max_request_mb", type=int, default=None)
    parser.add_argument("--max_concurrency", type=int, default=None)
    return parser.parse_args(argv)


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """``ServerLimits`` from the environment, with the flags given on the command line winning."""
    flags = ("host", "max_request_mb", "max_concurrency")
    overrides = {f: getattr(args, f) for f in flags if getattr(args, f, None) is not None}
    base = ServerLimits()
    if "max_request_mb" in overrides:  # one full request must fit in the in-flight budget
        overrides.setdefault(
            "max_inflight_mb", max(base.max_inflight_mb, overrides["max_request_mb"])
        )
    return ServerLimits(**overrides)


def serve(argv: list[str] | None = None) -> None:
    """Load the model and serve it until SIGTERM/SIGINT."""
    argv = sys.argv[1:] if argv is None else argv
    bounded = limit_malloc_arenas(ServerLimits().malloc_arenas)  # before kserve starts threads
    with clean_argv(argv):  # kserve parses sys.argv on import: let it see ours only
        args = parse_args(argv)
        import kserve.model_server as ks
    limits = limits_from_args(args)
    from model_server.kserve_server import MedsegModelServer
    from model_server.predictor import MedsegPredictor
    from model_server.rest import InflightBudget, install

    if not bounded:
        log.warning("malloc arenas not bounded (not glibc): RSS may grow with worker threads")
    model = MedsegPredictor(args.model_name, args.model_dir, limits)
    model.load()
    budget = InflightBudget(limits.max_inflight_bytes)
    server = MedsegModelServer(
        limits,
        budget,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        enable_grpc=args.enable_grpc,
    )
    install(ks.app, server.dataplane, limits, budget)
    server.start([model])
