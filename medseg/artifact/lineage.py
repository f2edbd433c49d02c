"""Lineage: from raw data to every served answer, and back (``medseg lineage REF``).

The chain, as the store records it::

    raw fingerprint → dataset NAME@VERSION → preprocessing fingerprint → training run
    (its MLflow run, its KFP run when any) → registered version NAME@vN (sha256 of each file,
    its MLflow version) → deployments (InferenceServices serving it, read from the cluster when
    one is reachable) → batch predictions (``predictions.json``)

Every link is read from what the platform wrote: the dataset manifest (its version is its
content hash; the raw fingerprint hashes its files' sha256s), the run's ``model/lineage.json``
and ``mlflow.json``, the version's ``model_card.json`` and the ``predictions.json`` of each batch
prediction. :func:`lineage` starts from any link and walks both ways: up to the raw data and
down to everything derived from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from medseg.artifact.files import CARD_FILE, LINEAGE_FILE, RUN_MODEL_DIR
from medseg.core.errors import MedsegError, ObjectNotFound
from medseg.core.storage import Storage, join
from medseg.data.manifest import Manifest, list_manifests

__all__ = ["Lineage", "deployments_of", "lineage", "raw_fingerprint"]

#: How a run's lineage key ends (``…/runs/RUN_ID/model/lineage.json``).
_RUN_LINEAGE = f"/{RUN_MODEL_DIR}/{LINEAGE_FILE}"


def raw_fingerprint(manifest: Manifest) -> str:
    """sha256 (16 hex digits) of the raw files of a dataset version: their sha256s, sorted."""
    shas = sorted(f.sha256 for c in manifest.cases for f in c.files)
    return hashlib.sha256("\n".join(shas).encode()).hexdigest()[:16]


@dataclass
class Lineage:
    """Everything linked to one reference, upstream and downstream.

    Attributes:
        ref: What was asked for.
        datasets: ``NAME@VERSION`` → raw fingerprint.
        runs: Run id → its ``lineage.json`` (plus ``mlflow``: its MLflow run, when tracked).
        models: ``NAME@vN`` → its model card (plus ``uri``).
        deployments: InferenceServices serving one of :attr:`models` (namespace/name → model).
        predictions: ``predictions.json`` URI → the model it names.
        cluster: How the cluster was read ("" when it was; else why not).
    """

    ref: str
    datasets: dict[str, str] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    deployments: dict[str, str] = field(default_factory=dict)
    predictions: dict[str, str] = field(default_factory=dict)
    cluster: str = ""

    def lines(self) -> list[str]:
        """The chain as text, one link a line, from the raw data down."""
        out = [f"lineage of {self.ref}"]
        for ds, raw in self.datasets.items():
            out.append(f"raw data {raw} → dataset {ds}")
        for run_id, doc in self.runs.items():
            ds = doc["dataset"]
            mlflow = doc.get("mlflow") or {}
            kfp = doc.get("kfp_run_id")
            out.append(
                f"  dataset {ds['name']}@{ds['version']} → preprocessing {doc['preprocessing']}"
                f" → run {run_id} (MLflow run {mlflow.get('run_id', '—')}"
                + (f" at {mlflow['tracking_uri']}" if mlflow.get("tracking_uri") else "")
                + (f", KFP run {kfp}" if kfp else "")
                + ")"
            )
        for name, card in self.models.items():
            files = ", ".join(f"{f} sha256:{sha}" for f, sha in sorted(card["files"].items()))
            tracked = card.get("mlflow") or {}
            mlflow = f"; MLflow {tracked['name']} version {tracked['version']}" if tracked else ""
            out.append(f"    run {card['run_id']} → model {name} ({files}{mlflow})")
            out.append(f"      card {card['uri']}/{CARD_FILE}")
        for isvc, model in self.deployments.items():
            out.append(f"      model {model} → InferenceService {isvc}")
        if self.cluster:
            out.append(f"      deployments: {self.cluster}")
        for uri, model in self.predictions.items():
            out.append(f"      model {model} → predictions {uri}")
        return out

    def to_json(self) -> dict[str, Any]:
        """The links as one JSON document."""
        return {
            "ref": self.ref,
            "datasets": self.datasets,
            "runs": self.runs,
            "models": self.models,
            "deployments": self.deployments,
            "predictions": self.predictions,
            "cluster": self.cluster,
        }


@dataclass
class _Store:
    """Every link the store records (read once)."""

    manifests: dict[str, Manifest]
    runs: dict[str, dict[str, Any]]
    cards: dict[str, dict[str, Any]]
    predictions: dict[str, dict[str, Any]]


def _read(storage: Storage, store: str) -> _Store:
    manifests = {f"{m.name}@{m.version}": m for m in list_manifests(storage, store)}
    runs: dict[str, dict[str, Any]] = {}
    cards: dict[str, dict[str, Any]] = {}
    predictions: dict[str, dict[str, Any]] = {}
    for obj in storage.list(store):
        uri = obj.uri
        if uri.endswith(_RUN_LINEAGE) and "/runs/" in uri:
            doc = storage.get_json(uri)
            mlflow = _optional_json(storage, join(uri.rsplit("/", 2)[0], "mlflow.json"))
            if mlflow is not None:
                doc.setdefault("mlflow", {}).update(mlflow)
            runs[doc["run_id"]] = doc
        elif uri.endswith(f"/{CARD_FILE}") and "/models/" in uri:
            card = storage.get_json(uri)
            card["uri"] = uri.rsplit("/", 1)[0]
            cards[f"{card['name']}@{card['version']}"] = card
        elif uri.endswith("/predictions.json"):
            predictions[uri] = storage.get_json(uri)
    return _Store(manifests, runs, cards, predictions)


def _optional_json(storage: Storage, uri: str) -> dict[str, Any] | None:
    try:
        doc = storage.get_json(uri)
    except ObjectNotFound:
        return None
    return doc if isinstance(doc, dict) else None


def _model_of_prediction(index: dict[str, Any], st: _Store, store: str) -> str:
    """The registered version (``NAME@vN``) or run (``run:ID``) a prediction names."""
    model = str(index.get("model", ""))
    for name, card in st.cards.items():
        if model in (name, card["uri"]):
            return name
    if model.startswith(join(store, "runs") + "/"):
        return f"run:{model.split('/runs/', 1)[1].split('/', 1)[0]}"
    if model in st.runs:
        return f"run:{model}"
    return model


def deployments_of(model_uris: dict[str, str], namespace: str | None) -> tuple[dict[str, str], str]:
    """InferenceServices whose storage URI is one of ``model_uris`` (URI → ``NAME@vN``).

    Returns:
        ``namespace/name`` → ``NAME@vN``, and "" when the cluster was read, else why it was not.
    """
    if not model_uris:
        return {}, ""
    try:
        from kubernetes import client, config

        config.load_config()
        api = client.CustomObjectsApi()
        group, version, plural = "serving.kserve.io", "v1beta1", "inferenceservices"
        found = (
            api.list_namespaced_custom_object(group, version, namespace, plural)
            if namespace
            else api.list_cluster_custom_object(group, version, plural)
        )
    except Exception as exc:  # no kube config, no cluster, no CRD: all mean "not reachable"
        return {}, f"cluster not reachable ({type(exc).__name__}: {str(exc)[:200]})"
    out = {}
    for isvc in found.get("items", []):
        text = json.dumps(isvc.get("spec", {}))
        for uri, name in model_uris.items():
            if json.dumps(uri) in text:
                meta = isvc["metadata"]
                out[f"{meta.get('namespace')}/{meta['name']}"] = name
    return out, ""


def lineage(
    storage: Storage,
    store: str,
    ref: str,
    namespace: str | None = None,
    cluster: bool = True,
) -> Lineage:
    """Everything linked to ``ref``, upstream to the raw data and downstream to predictions.

    Args:
        storage: The object store.
        store: The platform's store.
        ref: A dataset ``NAME@VERSION``, a training run id, a registered ``NAME@vN``, an
            InferenceService name (with ``cluster``), or a ``predictions.json`` URI.
        namespace: The InferenceServices' namespace (all namespaces when omitted).
        cluster: Read deployments from the cluster (kube config or in-cluster).

    Raises:
        MedsegError: If ``ref`` names nothing the store (or cluster) knows.
    """
    st = _read(storage, store)
    out = Lineage(ref)
    datasets, runs, models = _named(storage, store, ref, st, out, namespace, cluster)
    # upstream: models → runs → datasets
    runs |= {st.cards[m]["run_id"] for m in models if m in st.cards}
    datasets |= {_ds(st.runs[r]) for r in runs if r in st.runs}
    # downstream: datasets → runs → models (what the ref leads to)
    if ref in st.manifests or ref in st.runs:
        models |= {n for n, c in st.cards.items() if c["run_id"] in runs}
    for ds in sorted(datasets):
        manifest = st.manifests.get(ds)
        out.datasets[ds] = raw_fingerprint(manifest) if manifest else "(manifest missing)"
    out.runs = {r: st.runs[r] for r in sorted(runs) if r in st.runs}
    out.models = {m: st.cards[m] for m in sorted(models)}
    if cluster:
        uris = {st.cards[m]["uri"]: m for m in models}
        out.deployments, out.cluster = deployments_of(uris, namespace)
    else:
        out.cluster = "not read (--no-cluster)"
    for uri, index in st.predictions.items():
        model = _model_of_prediction(index, st, store)
        if model in models or model.removeprefix("run:") in runs:
            out.predictions[uri] = model
    return out


def _named(
    storage: Storage,
    store: str,
    ref: str,
    st: _Store,
    out: Lineage,
    namespace: str | None,
    cluster: bool,
) -> tuple[set[str], set[str], set[str]]:
    """The datasets, runs and models ``ref`` itself names (a predictions.json joins ``out``).

    Raises:
        MedsegError: If ``ref`` names nothing the store (or cluster) knows.
    """
    datasets: set[str] = set()
    runs: set[str] = set()
    models: set[str] = set()
    if ref in st.manifests:
        datasets.add(ref)
        runs |= {r for r, d in st.runs.items() if _ds(d) == ref}
    elif ref in st.runs:
        runs.add(ref)
    elif ref in st.cards:
        models.add(ref)
    elif ref.endswith("predictions.json"):
        index = st.predictions.get(ref) or _optional_json(storage, ref)
        if index is None:
            raise MedsegError(f"{ref} does not exist")
        st.predictions[ref] = index
        model = _model_of_prediction(index, st, store)
        if model in st.cards:
            models.add(model)
        elif model.startswith("run:"):
            runs.add(model.removeprefix("run:"))
        out.predictions[ref] = model
    else:
        uris = {c["uri"]: n for n, c in st.cards.items()}
        deployed, why = deployments_of(uris, namespace) if cluster else ({}, "not read")
        named = {k: v for k, v in deployed.items() if k.rsplit("/", 1)[-1] == ref}
        if not named:
            more = f"; {why}" if why else ""
            raise MedsegError(
                f"{ref!r} is no dataset version, run, registered model, predictions.json or "
                f"InferenceService known to {store}{more}"
            )
        models |= set(named.values())
    return datasets, runs, models


def _ds(doc: dict[str, Any]) -> str:
    return f"{doc['dataset']['name']}@{doc['dataset']['version']}"
