r"""The server's log lines: one line per record, whatever a client sends.

A client controls many strings that reach the logs: the URL path (uvicorn's access log,
URL-decoded), a model name, a gRPC ``model_name``, request ids, parameters, the names of zip
members. Written raw, a ``\n`` in any of them starts a forged, well-formed log line. Two
things prevent it:

* :class:`OneLineRecord`, the server process's log record (:func:`install`): every control
  character of a message (C0, DEL, C1, and the Unicode line and paragraph separators) is written
  as a backslash escape that JSON reads back (``\n``, ``\u001b``), in the message as
  formatted and in each string argument (uvicorn's access formatter reads its arguments
  directly); a record's traceback, which the server's own code writes, keeps its lines;
* :func:`event`, the server's own structured lines: a JSON object whose user strings are JSON
  values (``{"event": "refused", "status": 400, "where": "POST /v2/…", "reason": "…"}``).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson

__all__ = ["OneLineRecord", "escape", "event", "install"]

#: Characters that end or rewrite a line on a terminal or in a log collector.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or f"\\u{ord(char):04x}"


def escape(text: str) -> str:
    r"""``text`` with every control character as a JSON-style escape (``\n``, ``\u001b``, …)."""
    return _CONTROLS.sub(_escaped, text)


class OneLineRecord(logging.LogRecord):
    """A log record that formats to one line: see the module's docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.args, tuple):
            self.args = tuple(escape(a) if isinstance(a, str) else a for a in self.args)
        elif isinstance(self.args, dict):
            self.args = {k: escape(v) if isinstance(v, str) else v for k, v in self.args.items()}

    def getMessage(self) -> str:
        """The formatted message, escaped (a ``%s`` of any object can hold a newline)."""
        return escape(super().getMessage())


def install() -> None:
    """Make every log record of this process a :class:`OneLineRecord` (call once, at start)."""
    logging.setLogRecordFactory(OneLineRecord)


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log one structured line: ``{"event": name, **fields}`` as JSON (user strings as values)."""
    if logger.isEnabledFor(level):
        line = orjson.dumps({"event": name, **fields}, default=str).decode()
        logger.log(level, "%s", line)
