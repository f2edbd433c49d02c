"""Exporting a model artifact's network as the ONNX graph the CPU engines run.

The graph (:data:`~medseg.artifact.files.GRAPH_FILE`) belongs to the artifact: it is built from the
artifact's verified ``model.pt`` and ``model.yaml`` (:func:`artifact_graph`) and stamped with the
sha256 of those weights. :func:`export_model` adds it to an artifact in place;
:func:`medseg.registry.register.register` adds it to each version it registers with ``export``. How
a graph is traced from a network, and how it runs, is the engines'
(:func:`medseg.inference.engine.export_graph`, :func:`medseg.inference.engine.graph_forward`).
"""

from __future__ import annotations

from medseg.artifact.files import GRAPH_FILE, Artifact
from medseg.config import MedsegConfig
from medseg.core.errors import MedsegError
from medseg.core.storage import Storage, join
from medseg.inference.engine import export_graph, weights_digest
from medseg.inference.infer import load_network

__all__ = ["artifact_graph", "export_model"]


def artifact_graph(cfg: MedsegConfig, weights: bytes, uri: str) -> bytes:
    """The ONNX graph of the network of ``cfg`` holding ``weights`` (``uri``'s ``model.pt``).

    Raises:
        MedsegError: If the weights do not fit the network.
    """
    return export_graph(load_network(cfg, weights, uri), cfg, weights_digest(weights))


def export_model(uri: str, storage: Storage | None = None) -> str:
    """Add :data:`~medseg.artifact.files.GRAPH_FILE` to the model artifact at ``uri``.

    The graph is exported from the artifact's ``model.pt`` and ``model.yaml``, both checked
    against the artifact's record. A graph that the record lists (a version registered with its
    graph) is never written again: the export is not byte-for-byte reproducible, and a
    registered version does not change. An unrecorded graph (a hand-made folder, a training
    run's model) is replaced.

    Args:
        uri: A model artifact (see :mod:`medseg.artifact.files`).
        storage: Storage to use; from the environment when omitted.

    Returns:
        The sha256 of the graph written.

    Raises:
        MedsegError: If ``uri`` is no model artifact, its weights do not fit its config, or its
            record lists a graph.
    """
    storage = storage or Storage()
    artifact = Artifact.open(uri, storage)
    if GRAPH_FILE in artifact.hashes:
        raise MedsegError(
            f"{uri}/{GRAPH_FILE} is recorded in {artifact.record}: the artifact is exported "
            "already, and a recorded file is never rewritten"
        )
    cfg, weights = artifact.read_model()
    graph = artifact_graph(cfg, weights, uri)
    return str(storage.put_bytes(join(uri, GRAPH_FILE), graph).sha256)
