"""Import kserve without letting it read this process's command line.

``kserve.model_server`` (imported by ``import kserve`` and by its protobuf modules) parses
``sys.argv`` with its own argparse parser at import time. Under ``medseg predict … --grpc`` that
parser sees ``--grpc``, finds it ambiguous among its ``--grpc_*`` flags and exits the process.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

__all__ = ["clean_argv"]


@contextlib.contextmanager
def clean_argv(argv: list[str] | None = None) -> Iterator[None]:
    """While importing kserve: ``sys.argv`` is the program name plus ``argv`` only."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "medseg", *(argv or [])]
    try:
        yield
    finally:
        sys.argv = saved
