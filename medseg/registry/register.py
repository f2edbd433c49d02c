"""The model registry: immutable, growing versions of trained models with their lineage.

``STORE/models/NAME/vN/`` holds ``model.pt``, ``model.yaml``, ``model.onnx`` when registered with
``export`` (the graph the CPU engines run, see :mod:`medseg.registry.export`) and
``model_card.json``; the card is written last, so a version exists only once it is complete.
Versions only grow (v1, v2, …); ``NAME@latest`` is the highest.

A version number is taken by creating ``vN/claim.json`` exclusively (S3 ``If-None-Match: *``,
an atomic create on a local store): of concurrent registrations of one name, in any number of
processes or machines, each gets its own number and none overwrites another. A number claimed
by a registration that then failed stays unused. Names follow :mod:`medseg.core.names`.

With ``MLFLOW_TRACKING_URI`` set, :func:`register` is the one function that writes both
registries: medseg's (the source of truth: content-addressed, every file's sha256 in the card)
and MLflow's registered-model version (a mirror for the UI, see :mod:`medseg.registry.tracking`).
The MLflow version is created after the files are stored and before the card is written; the card
then records it. A failed MLflow write fails the registration before the card exists, so no
medseg version is ever without its MLflow version; a failed card write deletes the MLflow
version again. The alias ``champion`` moves to a version whose evaluation passed the quality
gate, after :func:`medseg.registry.tracking.verify_version` found both registries in agreement.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medseg.artifact.files import (
    CARD_FILE,
    CONFIG_FILE,
    GRAPH_FILE,
    LINEAGE_FILE,
    MODEL_FILES,
    WEIGHTS_FILE,
    parse_config,
    recorded_hashes,
    run_model_uri,
)
from medseg.core.errors import MedsegError
from medseg.core.names import check_name
from medseg.core.storage import Storage, is_s3, join
from medseg.registry.tracking import (
    git_revision,
    register_version,
    set_champion,
    unregister_version,
)

__all__ = [
    "list_models",
    "model_card_markdown",
    "model_identity",
    "model_uri",
    "register",
    "resolve_model",
]

_VERSION = re.compile(rf"/models/([^/]+)/v(\d+)/{re.escape(CARD_FILE)}$")
_TAKEN = re.compile(r"/models/[^/]+/v(\d+)/")
#: Give up claiming after this many numbers were taken under our feet (a runaway, not a race).
_MAX_CLAIMS = 1000


def list_models(storage: Storage, store: str, name: str | None = None) -> list[dict[str, Any]]:
    """Model cards in the registry, by name then version."""
    if name is not None:
        check_name(name, "model name")
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
    check_name(name, "model name")
    if version not in ("", "latest"):
        check_name(version, "model version")
    cards = list_models(storage, store, name)
    if not cards:
        raise MedsegError(f"no model {name!r} registered in {store}")
    if version in ("", "latest"):
        version = cards[-1]["version"]
    if version not in {c["version"] for c in cards}:
        known = ", ".join(c["version"] for c in cards)
        raise MedsegError(f"model {name} has no version {version} (registered: {known})")
    return join(store, "models", name, version)


def model_uri(storage: Storage, store: str, model: str) -> str:
    """What a user names a model by, to the model's prefix.

    Args:
        storage: The object store.
        store: ``s3://BUCKET`` (or a folder) of the platform.
        model: A training run id (its ``runs/RUN/model``), a registered ``NAME@VERSION`` (or
            ``NAME@latest``), or the model's own URI or folder.

    Raises:
        MedsegError: If a registered model or version does not exist.
    """
    if is_s3(model) or Path(model).is_dir():
        return model
    if "@" in model:
        return resolve_model(storage, store, model)
    return run_model_uri(join(store, "runs", model))


def model_identity(storage: Storage, uri: str) -> dict[str, str]:
    """What a served answer names its model by: the version and the weights' sha256.

    ``model_version`` is ``NAME@vN`` for a registered version (its card), ``run:RUN_ID`` for a
    run's model (its lineage), else ``unregistered``; ``model_sha256`` is the sha256 of
    ``model.pt`` as its record holds it (the loader checked the file against it), else computed.
    """
    record, hashes = recorded_hashes(uri, storage)
    sha = (
        hashes.get(WEIGHTS_FILE)
        or hashlib.sha256(storage.get_bytes(join(uri, WEIGHTS_FILE))).hexdigest()
    )
    version = "unregistered"
    if record:
        doc = storage.get_json(join(uri, record))
        if record == CARD_FILE:
            version = f"{doc['name']}@{doc['version']}"
        elif doc.get("run_id"):
            version = f"run:{doc['run_id']}"
    return {"model_version": version, "model_sha256": sha}


def model_card_markdown(name: str, uri: str, card: dict[str, Any]) -> str:
    """A registered version's model card as Markdown (the pipeline's card artifact)."""
    dataset = card["dataset"]
    lines = [
        f"# {name} {card['version']}",
        "",
        f"- model: `{uri}`",
        f"- dataset: `{dataset['name']}@{dataset['version']}`",
        f"- preprocessing: `{card['preprocessing']}`",
        f"- run: `{card['run_id']}`, code `{card['code_version']}`",
    ]
    if "inference" in card:  # cards of versions registered before it was recorded lack it
        settings = ", ".join(f"{k} `{v}`" for k, v in card["inference"].items())
        lines.append(f"- inference: {settings}")
    evaluation = card.get("evaluation") or {}
    gate = evaluation.get("gate") or {}
    metric = gate.get("metric", "dice_mean")
    if isinstance(evaluation.get(metric), float):
        verdict = "passed" if gate.get("passed") else "not passed"
        lines.append(
            f"- validation {metric}: {evaluation[metric]:.4f} "
            f"(gate {gate.get('threshold')}: {verdict})"
        )
    for key, value in sorted(evaluation.get("dice", {}).items()):
        lines.append(f"- validation Dice {key}: {value:.4f}")
    for cls, auc in zip(evaluation.get("classes", []), evaluation.get("auc", []), strict=False):
        lines.append(f"- validation ROC AUC {cls}: {auc:.4f}")
    if "balanced_accuracy" in evaluation:
        lines.append(f"- validation balanced accuracy: {evaluation['balanced_accuracy']:.4f}")
    if "hd95_definition" in evaluation:
        lines.append(f"- HD95 definition: `{evaluation['hd95_definition']}`")
    return "\n".join(lines) + "\n"


#: What of an evaluation's ``metrics.json`` the card leaves out: the per-case table, and what
#: the card records itself or that the evaluation's files hold at length.
_NOT_IN_CARD = frozenset({"model", "predictions", "missing_predictions", "cases", "conventions"})


def _evaluation_summary(ev: dict[str, Any], uri: str) -> dict[str, Any]:
    """The card's ``evaluation``: the task's scores, the gate, the metric definitions."""
    summary = {"uri": uri} | {k: v for k, v in ev.items() if k not in _NOT_IN_CARD}
    summary.setdefault("definition", "channel Dice of the preprocessed volumes")
    if "dice" in ev:  # metrics.json of a segmentation written before these were recorded
        summary.setdefault("hd95_definition", "monai-max-directed-95")  # before issue 22.2
        summary["gate"] = {"metric": "dice_mean", **ev["gate"]}
    return summary


def register(
    storage: Storage,
    store: str,
    run_id: str,
    name: str,
    evaluation: str | None = None,
    export: bool = False,
) -> dict[str, Any]:
    """Copy a finished run's model into the registry as the next version of ``name``.

    Args:
        storage: Storage to use.
        store: Root URI of the store.
        run_id: The finished training run.
        name: Model name.
        evaluation: ``metrics.json`` of a ``medseg evaluate`` run on this model; its means,
            gate and metric definitions (``definition``, ``hd95_definition``) go into the card.
        export: Also export the network as ``model.onnx`` (from the verified ``model.pt``) for
            the CPU engines of :mod:`medseg.inference.engine`; its sha256 joins the card's
            ``files``.

    Returns:
        The model card (with ``mlflow``: the MLflow version, when tracked).

    Raises:
        InvalidName: If ``name`` or ``run_id`` breaks the naming rule.
        MedsegError: If the run has no finished model (or, with ``export``, one that does not
            load).
        ChecksumMismatch: If a model file no longer matches the hash its run recorded.
        TrackingError: With ``MLFLOW_TRACKING_URI`` set, if the MLflow version cannot be
            created (no card is written: the version number stays unused).
        RegistryMismatch: If MLflow already holds a version claiming this one, or (the alias
            not moved) disagrees with the card just written.
    """
    check_name(name, "model name")
    check_name(run_id, "run id")
    run_model = run_model_uri(join(store, "runs", run_id))
    lineage, blobs = _finished_model(storage, run_id, run_model)
    if export:
        blobs[GRAPH_FILE] = _export(blobs[WEIGHTS_FILE], blobs[CONFIG_FILE], run_model)
    summary = None
    if evaluation is not None:  # read everything before a version number is taken
        summary = _evaluation_summary(storage.get_json(evaluation), evaluation)
    number = _claim_version(storage, store, name, run_id)
    prefix = join(store, "models", name, f"v{number}")
    files = {f: storage.put_bytes(join(prefix, f), data).sha256 for f, data in blobs.items()}
    card = {
        "name": name,
        "version": f"v{number}",
        "version_number": number,
        "run_id": run_id,
        "dataset": lineage["dataset"],
        "preprocessing": lineage["preprocessing"],
        "metrics": lineage["best"],
        "inference": _inference_settings(blobs[CONFIG_FILE], run_model),
        "files": files,
        "code_version": git_revision(),
        "created_at": datetime.now(UTC).isoformat(),
    }
    if summary is not None:
        card["evaluation"] = summary
    passed = summary is not None and bool(summary["gate"].get("passed"))
    _write_card(storage, store, prefix, card, passed)
    return card


def _finished_model(
    storage: Storage, run_id: str, run_model: str
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A finished run's lineage and its model files, each checked against the lineage's sha256.

    Raises:
        MedsegError: If the run has no finished model.
        ChecksumMismatch: If a model file no longer matches the hash its run recorded.
    """
    try:
        lineage = storage.get_json(join(run_model, LINEAGE_FILE))
    except MedsegError:
        raise MedsegError(
            f"run {run_id} has no finished model ({run_model}/{LINEAGE_FILE})"
        ) from None
    recorded = lineage.get("files", {})
    blobs = {f: storage.get_bytes(join(run_model, f), sha256=recorded.get(f)) for f in MODEL_FILES}
    return lineage, blobs


def _write_card(
    storage: Storage, store: str, prefix: str, card: dict[str, Any], gate_passed: bool
) -> None:
    """Mirror the version to MLflow, then write its card (last); move ``champion`` if it passed.

    The card records the MLflow version (``mlflow``); a failed card write deletes the MLflow
    version again, so neither registry holds a version the other lacks.
    """
    tracked = register_version(storage, store, card, prefix)  # None: no tracking server
    if tracked is not None:
        card["mlflow"] = tracked
    try:
        storage.put_json(join(prefix, CARD_FILE), card)
    except BaseException:
        if tracked is not None:
            unregister_version(tracked)
        raise
    if tracked is not None and gate_passed:
        set_champion(storage, join(prefix, CARD_FILE))


def _inference_settings(config: bytes, where: str) -> dict[str, Any]:
    """What decides the served numbers besides the weights: engine, precision, window, nesting."""
    infer = parse_config(config, where).infer
    return {k: getattr(infer, k) for k in ("engine", "precision", "window", "nesting")}


def _export(weights: bytes, config: bytes, where: str) -> bytes:
    """The ONNX graph of the network in ``weights`` (see :mod:`medseg.registry.export`)."""
    # Here, not at the top: the registry's readers (`medseg models`, model_uri for the CLI's
    # serve and evaluate) load no torch or MONAI; the export does (seconds to import).
    from medseg.registry.export import artifact_graph

    return artifact_graph(parse_config(config, where), weights, where)


def _claim_version(storage: Storage, store: str, name: str, run_id: str) -> int:
    """Take the next free version number of ``name`` for good (see the module docstring).

    Raises:
        MedsegError: If no number could be claimed in :data:`_MAX_CLAIMS` tries.
    """
    taken = [
        int(m.group(1))
        for o in storage.list(join(store, "models", name))
        if (m := _TAKEN.search(o.uri))
    ]
    number = max(taken, default=0) + 1
    claim = {"run_id": run_id, "token": uuid.uuid4().hex, "at": datetime.now(UTC).isoformat()}
    body = json.dumps(claim, sort_keys=True).encode()
    for _ in range(_MAX_CLAIMS):
        if storage.create_bytes(join(store, "models", name, f"v{number}", "claim.json"), body):
            return number
        number += 1
    raise MedsegError(f"model {name}: could not claim a version after {_MAX_CLAIMS} tries")
