"""Static checks of the Dockerfiles (no Docker engine here to build them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "images").glob("Dockerfile*"))


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_pinned_non_root_and_secret_free(path: Path) -> None:
    steps = _instructions(path)
    args = {r.split("=", 1)[0]: r.split("=", 1)[1] for w, r in steps if w == "ARG" and "=" in r}
    froms = [r for w, r in steps if w == "FROM"]
    assert len(froms) == 2  # a build stage and a slim runtime stage
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base  # pinned, no latest
    assert "VARIANT" in {r.split("=")[0] for w, r in steps if w == "ARG"}  # cpu / cuda
    users = [r for w, r in steps if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert [w for w, _ in steps].index("USER") > max(
        i for i, (w, _) in enumerate(steps) if w in ("RUN", "COPY")
    )  # USER comes after every RUN and COPY: the image runs as uid 1000
    text = path.read_text()
    for secret in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MINIO_ROOT_PASSWORD"):
        assert secret not in text
    assert "uv pip install" in text and "requirements.lock" in text  # the pinned set


def test_make_images_names_both_dockerfiles() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "images/Dockerfile " in makefile and "images/Dockerfile.server" in makefile
