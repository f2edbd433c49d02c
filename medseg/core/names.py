"""The one rule for every name that becomes part of a storage key.

Dataset names, dataset versions, model names, model versions, run ids and case ids all end up
as one path segment of a key (``datasets/NAME/VERSION/…``, ``models/NAME/vN/…``,
``runs/RUN_ID/…``, ``raw/CASE/…``). A name is:

* 1 to :data:`MAX_LENGTH` characters,
* of ASCII letters, digits, ``.``, ``_`` and ``-`` (the pattern :data:`PATTERN`),
* starting with a letter or digit,
* without ``..`` anywhere.

That refuses path traversal (``..``, ``/``), the ``@`` that separates a name from its version in
``NAME@VERSION``, whitespace and control characters, and names too long for a key, up front,
with a message that names the rule broken.
"""

from __future__ import annotations

import re

from medseg.core.errors import InvalidName

__all__ = ["MAX_LENGTH", "PATTERN", "RULE", "check_name"]

#: Longest accepted name: well inside S3's 1024-byte keys with every prefix around it.
MAX_LENGTH = 128
#: The whole rule as a regular expression.
PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_LENGTH - 1}}}")
#: The rule in words, quoted in every refusal.
RULE = (
    f"1-{MAX_LENGTH} characters of letters, digits, '.', '_' and '-', "
    "starting with a letter or digit, without '..'"
)


def _broken_rule(name: str) -> str:
    """The first rule ``name`` breaks, in words (empty when it breaks none)."""
    if not name:
        return "it is empty"
    if len(name) > MAX_LENGTH:
        return f"it is {len(name)} characters long (at most {MAX_LENGTH})"
    for ch in name:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return f"it contains the control character U+{ord(ch):04X}"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if ".." in name:
        return "it contains '..' (path traversal)"
    if "@" in name:
        return "it contains '@', which separates a name from its version (NAME@VERSION)"
    bad = sorted({ch for ch in name if not (ch.isascii() and (ch.isalnum() or ch in "._-"))})
    if bad:
        return f"it contains {', '.join(repr(c) for c in bad)}"
    if not name[0].isalnum():
        return f"it starts with {name[0]!r}"
    return ""


def check_name(name: str, kind: str) -> str:
    """Return ``name`` if it is a valid name, else refuse it naming the rule it breaks.

    Args:
        name: The name to check.
        kind: What it names, for the message: ``dataset name``, ``model name``, ``run id``…

    Returns:
        ``name``, unchanged.

    Raises:
        InvalidName: If ``name`` breaks the rule (the message says which part, and the rule).
    """
    if isinstance(name, str) and PATTERN.fullmatch(name) and ".." not in name:
        return name
    reason = _broken_rule(name) if isinstance(name, str) else f"it is a {type(name).__name__}"
    shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "…"
    raise InvalidName(f"{kind} {shown} is not allowed: {reason}; a name is {RULE}")
