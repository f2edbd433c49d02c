"""No function of the platform's code longer than ``MAX_LINES`` (``make lint`` runs this).

A function that does five jobs is split into named steps that do one each (issue 24). The
length counted is the body's lines without the docstring; nested functions count on their own
and inside their parent. Prints every function over the limit and exits 1 if there is one.

    python scripts/function_length.py medseg model_server components pipelines
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

#: The most lines a function's body may have, its docstring not counted.
MAX_LINES = 60


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the ``def`` to the function's end, less its docstring's."""
    end = node.end_lineno or node.lineno
    first = node.body[0]
    doc = 0
    is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if is_doc and isinstance(first.value.value, str):
        doc = (first.end_lineno or first.lineno) - first.lineno + 1
    return end - node.lineno + 1 - doc


def too_long(roots: list[str]) -> list[str]:
    """``path:line name (N lines)`` of every function over :data:`MAX_LINES`, longest first."""
    found: list[tuple[int, str]] = []
    for root in roots:
        for path in sorted(Path(root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = _body_lines(node)
                    if lines > MAX_LINES:
                        found.append((lines, f"{path}:{node.lineno} {node.name} ({lines} lines)"))
    return [text for _, text in sorted(found, reverse=True)]


def main() -> None:
    """Check the folders named on the command line."""
    over = too_long(sys.argv[1:])
    for line in over:
        print(f"{line}: over {MAX_LINES}; split it into named steps", file=sys.stderr)
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()
