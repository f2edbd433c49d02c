"""The model registry: immutable, growing versions of trained models with their lineage.

``STORE/models/NAME/vN/`` holds ``model.pt``, ``model.yaml`` and ``model_card.json``; the card is
written last, so a version exists only once it is complete. Versions only grow (v1, v2, …);
``NAME@latest`` is the highest.
"""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.storage import Storage, check_name, join

__all__ = ["list_models", "register", "resolve_model"]

_VERSION = re.compile(r"/models/([^/]+)/v(\d+)/model_card\.json$")
_FILES = ("model.pt", "model.yaml")


def _code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def list_models(storage: Storage, store: str, name: str | None = None) -> list[dict[str, Any]]:
    """Model cards in the registry, by name then version."""
    cards = []
    for obj in storage.list(join(store, "models", name or "")):
        if _VERSION.search(obj.uri):
            cards.append(storage.get_json(obj.uri))
    return sorted(cards, key=lambda c: (c["name"], c["version_number"]))


def resolve_model(storage: Storage, store: str, spec: str) -> str:
    """``NAME``, ``NAME@latest`` or ``NAME@vN`` to the version's prefix.

    Raises:
        MedsegError: If the model or version is not registered.
    """
    name, _, version = spec.partition("@")
    cards = list_models(storage, store, name)
    if not cards:
        raise MedsegError(f"no model {name!r} registered in {store}")
    if version in ("", "latest"):
        version = cards[-1]["version"]
    if version not in {c["version"] for c in cards}:
        known = ", ".join(c["version"] for c in cards)
        raise MedsegError(f"model {name} has no version {version} (registered: {known})")
    return join(store, "models", name, version)


def register(
    storage: Storage, store: str, run_id: str, name: str, evaluation: str | None = None
) -> dict[str, Any]:
    """Copy a finished run's model into the registry as the next version of ``name``.

    Args:
        storage: Storage to use.
        store: Root URI of the store.
        run_id: The finished training run.
        name: Model name.
        evaluation: ``metrics.json`` of a ``medseg evaluate`` run on this model; its means
            and gate go into the card.

    Returns:
        The model card.

    Raises:
        MedsegError: If the run has no finished model.
    """
    check_name("model name", name)
    run_model = join(store, "runs", check_name("run id", run_id), "model")
    try:
        lineage = storage.get_json(join(run_model, "lineage.json"))
    except MedsegError:
        raise MedsegError(
            f"run {run_id} has no finished model ({run_model}/lineage.json)"
        ) from None
    existing = list_models(storage, store, name)
    number = existing[-1]["version_number"] + 1 if existing else 1
    prefix = join(store, "models", name, f"v{number}")
    files = {}
    for f in _FILES:
        data = storage.get_bytes(join(run_model, f))
        files[f] = storage.put_bytes(join(prefix, f), data).sha256
    card = {
        "name": name,
        "version": f"v{number}",
        "version_number": number,
        "run_id": run_id,
        "dataset": lineage["dataset"],
        "preprocessing": lineage["preprocessing"],
        "metrics": lineage["best"],
        "files": files,
        "code_version": _code_version(),
        "created_at": datetime.now(UTC).isoformat(),
    }
    if evaluation is not None:
        ev = storage.get_json(evaluation)
        card["evaluation"] = {
            "uri": evaluation,
            "dataset": ev["dataset"],
            "split": ev["split"],
            "dice": ev["dice"],
            "hd95": ev["hd95"],
            "dice_mean": ev["dice_mean"],
            "gate": ev["gate"],
        }
    storage.put_json(join(prefix, "model_card.json"), card)
    return card
