"""The model artifact: its files, their sha256 records, and reading them back verified.

A model artifact is a folder or prefix holding :data:`WEIGHTS_FILE` (``model.pt``, the state
dict) and :data:`CONFIG_FILE` (``model.yaml``, the full :class:`~medseg.config.MedsegConfig`),
and sometimes :data:`GRAPH_FILE` (``model.onnx``, the network exported for the CPU engines of
:mod:`medseg.inference.engine`). Where it lives:

* a training run's ``STORE/runs/RUN_ID/model`` (:func:`run_model_uri`), finished once its
  :data:`LINEAGE_FILE` (``lineage.json``) is written, last (:func:`write_model` then
  :func:`write_lineage`);
* a registered version's ``STORE/models/NAME/vN``, complete once its :data:`CARD_FILE`
  (``model_card.json``) is written, last (:mod:`medseg.registry.register`);
* a copy of either, such as KServe's ``/mnt/models``.

The lineage and the card both record the sha256 of each file of the artifact (their ``files``
map, :data:`HASH_RECORDS`); :class:`Artifact` reads the files back checked against it, so a copy
is used only if it is byte for byte the model its record describes. The module loads no torch
until :func:`write_model` runs: its names and its reader serve light clients too.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from medseg.config import MedsegConfig
from medseg.core.errors import ChecksumMismatch, MedsegError, ObjectNotFound
from medseg.core.storage import Storage, join

if TYPE_CHECKING:
    import torch

__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "GRAPH_FILE",
    "HASH_RECORDS",
    "LINEAGE_FILE",
    "MODEL_FILES",
    "RUN_MODEL_DIR",
    "WEIGHTS_FILE",
    "Artifact",
    "TrainedOn",
    "parse_config",
    "read_config",
    "recorded_hashes",
    "run_model_uri",
    "trained_on",
    "write_lineage",
    "write_model",
]

#: The weights: the network's state dict, as ``torch.save`` writes it.
WEIGHTS_FILE = "model.pt"
#: The full config the weights were trained with; everything is rebuilt from it.
CONFIG_FILE = "model.yaml"
#: The network exported as an ONNX graph (see :mod:`medseg.inference.engine`), when exported.
GRAPH_FILE = "model.onnx"
#: A training run's record of its model: files' sha256, dataset, preprocessing, best epoch.
LINEAGE_FILE = "lineage.json"
#: A registered version's model card (see :mod:`medseg.registry.register`).
CARD_FILE = "model_card.json"
#: The files every model artifact has, in the order they are written.
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE)
#: Where an artifact records the sha256 of its files, first found wins: a registered version's
#: card, a training run's lineage.
HASH_RECORDS = (CARD_FILE, LINEAGE_FILE)
#: The folder of a training run that holds its model.
RUN_MODEL_DIR = "model"


def run_model_uri(run_prefix: str) -> str:
    """The model artifact of the training run at ``run_prefix`` (``STORE/runs/RUN_ID``)."""
    return join(run_prefix, RUN_MODEL_DIR)


def parse_config(raw: bytes, uri: str) -> MedsegConfig:
    """The config in the bytes of ``uri``'s :data:`CONFIG_FILE`.

    Raises:
        MedsegError: If it is not a valid config.
    """
    return MedsegConfig.from_yaml(raw, f"{uri}/{CONFIG_FILE}")


def read_config(uri: str, storage: Storage) -> MedsegConfig:
    """The config a model artifact was trained with (its :data:`CONFIG_FILE`).

    Raises:
        MedsegError: If the file is missing or not a valid config.
    """
    try:
        raw_cfg = storage.get_bytes(join(uri, CONFIG_FILE))
    except ObjectNotFound as exc:
        raise MedsegError(f"{uri} is not a model artifact: {exc}") from None
    return parse_config(raw_cfg, uri)


def recorded_hashes(uri: str, storage: Storage) -> tuple[str, dict[str, str]]:
    """The sha256 of each file of the artifact at ``uri``, as its record holds them.

    Returns:
        The record's file name (one of :data:`HASH_RECORDS`) and its ``files`` map (file name
        to sha256); ``("", {})`` for an artifact with neither record (a hand-made folder).

    Raises:
        MedsegError: If the record is there but holds no such map.
    """
    for record in HASH_RECORDS:
        raw = _optional_bytes(storage, join(uri, record))
        if raw is None:
            continue
        try:
            files = json.loads(raw)["files"]
            if not all(isinstance(v, str) for v in files.values()):
                raise TypeError("a file's sha256 is not a string")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise MedsegError(
                f"{uri}/{record} holds no valid 'files' map of sha256s: {exc}"
            ) from None
        return record, dict(files)
    return "", {}


@dataclass(frozen=True)
class TrainedOn:
    """The dataset a model was trained on, as its lineage or card records it.

    Attributes:
        store: The store holding the dataset.
        dataset: ``NAME@VERSION``.
        run_id: The training run (None when the record names none).
    """

    store: str
    dataset: str
    run_id: str | None


def trained_on(uri: str, storage: Storage) -> TrainedOn:
    """The dataset the model artifact at ``uri`` was trained on (its lineage, else its card).

    Raises:
        MedsegError: If the artifact has neither record.
    """
    for name in (LINEAGE_FILE, CARD_FILE):
        raw = _optional_bytes(storage, join(uri, name))
        if raw is None:
            continue
        doc = json.loads(raw)
        ds = doc["dataset"]
        return TrainedOn(ds["store"], f"{ds['name']}@{ds['version']}", doc.get("run_id"))
    raise MedsegError(
        f"{uri} has neither {LINEAGE_FILE} nor {CARD_FILE}: pass the dataset explicitly"
    )


@dataclass
class Artifact:
    """A model artifact opened for reading: its files, checked against its record.

    Attributes:
        uri: The artifact's folder or prefix.
        storage: Where it is stored.
        record: The file recording its hashes (one of :data:`HASH_RECORDS`), or ``""``.
        hashes: File name to sha256, as the record holds them (empty without a record).
    """

    uri: str
    storage: Storage
    record: str = ""
    hashes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, uri: str, storage: Storage) -> Artifact:
        """The artifact at ``uri``, with its record's hashes (:func:`recorded_hashes`).

        Raises:
            MedsegError: If its record holds no valid ``files`` map.
        """
        record, hashes = recorded_hashes(uri, storage)
        return cls(uri, storage, record, hashes)

    def read(self, name: str) -> bytes | None:
        """The bytes of file ``name``, checked against the record; None if absent and unlisted.

        Raises:
            MedsegError: If the record lists the file and it is missing, or it differs from the
                record.
            ChecksumMismatch: If an unlisted file differs from the object store's own record.
        """
        try:
            return self.storage.get_bytes(join(self.uri, name), sha256=self.hashes.get(name))
        except ObjectNotFound:
            if name in self.hashes:
                raise MedsegError(
                    f"{self.uri}/{name} is missing, and {self.record} lists it"
                ) from None
            return None
        except ChecksumMismatch as exc:
            if name not in self.hashes:
                raise  # the object store's own record of the object: the message names it
            raise MedsegError(
                f"{self.uri}/{name} is not the file {self.record} records: {exc}"
            ) from None

    def read_model(self) -> tuple[MedsegConfig, bytes]:
        """The config and the weights' bytes, both checked against the record.

        Raises:
            MedsegError: If either is missing, differs from the record, or the config is
                invalid.
        """
        raw_cfg, weights = self.read(CONFIG_FILE), self.read(WEIGHTS_FILE)
        if raw_cfg is None or weights is None:
            missing = CONFIG_FILE if raw_cfg is None else WEIGHTS_FILE
            raise MedsegError(f"{self.uri} is not a model artifact: it has no {missing}")
        return parse_config(raw_cfg, self.uri), weights


def write_model(
    storage: Storage, uri: str, weights: Mapping[str, torch.Tensor], cfg: MedsegConfig
) -> dict[str, str]:
    """Write the weights and config of a model to ``uri`` (each atomically).

    Returns:
        Their sha256 by file name: the ``files`` map for :func:`write_lineage`.
    """
    import torch  # here, not at the top: the names and the reader load no torch

    buf = io.BytesIO()
    torch.save(weights, buf)
    stored = storage.put_bytes(join(uri, WEIGHTS_FILE), buf.getvalue())
    config = storage.put_bytes(join(uri, CONFIG_FILE), cfg.to_yaml().encode())
    return {WEIGHTS_FILE: str(stored.sha256), CONFIG_FILE: str(config.sha256)}


def write_lineage(
    storage: Storage, uri: str, files: Mapping[str, str], facts: Mapping[str, Any]
) -> dict[str, Any]:
    """Write the artifact's :data:`LINEAGE_FILE`, last: from then on the model is finished.

    Args:
        storage: Where the artifact is.
        uri: The artifact (a run's :func:`run_model_uri`).
        files: The sha256 of each file, by name (:func:`write_model`'s answer).
        facts: What else the lineage records (run, dataset, preprocessing, best epoch, …).

    Returns:
        The lineage written.
    """
    lineage = {"files": dict(files), **facts}
    storage.put_json(join(uri, LINEAGE_FILE), lineage)
    return lineage


def _optional_bytes(storage: Storage, uri: str) -> bytes | None:
    try:
        return storage.get_bytes(uri)
    except ObjectNotFound:
        return None
