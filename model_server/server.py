"""Start kserve's ModelServer (REST and gRPC) with the medseg predictor.

``python -m model_server --model_dir /mnt/models`` is the container's entrypoint; ``medseg serve``
calls :func:`serve`. All of kserve's own flags (``--http_port``, ``--grpc_port``, ``--workers``,
…) are accepted; ours are ``--model_dir``, ``--model_name``, ``--max_request_mb`` (also the gRPC
message limits, which kserve leaves at 8 MiB otherwise) and ``--max_concurrency``.
"""

from __future__ import annotations

import argparse
import os
import sys

from medseg.kserve_import import clean_argv

__all__ = ["DEFAULT_MAX_REQUEST_MB", "parse_args", "serve"]

#: Fits a full BraTS case as FP32 (136 MiB) with its JSON header and room to spare.
DEFAULT_MAX_REQUEST_MB = 256


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Kserve's flags plus ours."""
    from kserve.model_server import parser as kserve_parser

    parser = argparse.ArgumentParser(parents=[kserve_parser], conflict_handler="resolve")
    parser.add_argument(
        "--model_dir",
        default=os.environ.get("MEDSEG_MODEL_DIR", "/mnt/models"),
        help="Folder or s3:// prefix with model.yaml and model.pt.",
    )
    parser.add_argument("--model_name", default=os.environ.get("MEDSEG_MODEL_NAME", "medseg"))
    parser.add_argument("--max_request_mb", type=int, default=DEFAULT_MAX_REQUEST_MB)
    parser.add_argument("--max_concurrency", type=int, default=1)
    return parser.parse_args(argv)


def serve(argv: list[str] | None = None) -> None:
    """Load the model and serve it until SIGTERM/SIGINT."""
    argv = sys.argv[1:] if argv is None else argv
    with clean_argv(argv):  # kserve parses sys.argv on import: let it see ours only
        args = parse_args(argv)
        import kserve.model_server as ks
    limit = args.max_request_mb * 1024 * 1024

    # GRPCServer reads its message limits from kserve's module-level args.
    ks.args.grpc_max_send_message_length = limit
    ks.args.grpc_max_receive_message_length = limit
    from model_server.predictor import MedsegPredictor
    from model_server.rest import install

    model = MedsegPredictor(args.model_name, args.model_dir, args.max_concurrency)
    model.load()
    server = ks.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,  # the fast REST route lives in this process's app
        enable_grpc=args.enable_grpc,
    )
    install(ks.app, server.dataplane, limit)
    server.start([model])
