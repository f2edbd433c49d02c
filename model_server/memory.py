"""The server process's heap: bounded arenas, and free memory handed back after large requests.

glibc's malloc gives each worker thread an arena of its own unless told otherwise, and keeps
freed memory in its arenas: memory that a large request (or a refused one) used stays resident
after it, though nothing uses it (measured by ``benchmarks/bench_hostile.py``: a refused 200 MB
gRPC parameter left 614 MiB resident). :func:`limit_malloc_arenas` bounds the arenas at start;
:func:`release_free_memory` (``malloc_trim``) returns the free pages of every arena to the system
once a request of at least :data:`RELEASE_AFTER_BYTES` has let go of its bytes
(:class:`model_server.rest.InflightBudget`). Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
from typing import Any

__all__ = ["RELEASE_AFTER_BYTES", "limit_malloc_arenas", "release_free_memory"]

#: ``mallopt``'s parameter for the number of arenas (glibc's malloc.h).
_M_ARENA_MAX = -8
#: Requests at least this large hand their freed memory back to the system when they end.
RELEASE_AFTER_BYTES = 16 << 20


def _libc() -> Any | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def limit_malloc_arenas(arenas: int) -> bool:
    """Bound glibc's malloc arenas for the threads started from now on; False where not glibc.

    Call before the worker threads start: arenas already made stay.
    """
    return _LIBC is not None and bool(_LIBC.mallopt(_M_ARENA_MAX, arenas))


def release_free_memory() -> bool:
    """Hand the free pages of every malloc arena back to the system; False where not glibc."""
    return _LIBC is not None and bool(_LIBC.malloc_trim(0))
