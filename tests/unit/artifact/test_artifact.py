"""The model artifact: written with its lineage, read back checked against its record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medseg.artifact.files import (
    CARD_FILE,
    CONFIG_FILE,
    GRAPH_FILE,
    LINEAGE_FILE,
    WEIGHTS_FILE,
    Artifact,
    TrainedOn,
    read_config,
    recorded_hashes,
    run_model_uri,
    trained_on,
    write_lineage,
    write_model,
)
from medseg.core.errors import MedsegError
from medseg.core.storage import Storage
from medseg.tasks.networks import build_network
from tests.conftest import tiny_config


@pytest.fixture
def written(tmp_path: Path) -> Path:
    """A run's model as training writes it: weights, config, then the lineage."""
    cfg = tiny_config()
    torch.manual_seed(0)
    state = build_network(cfg.model).state_dict()
    uri = run_model_uri(str(tmp_path / "runs" / "r1"))
    storage = Storage()
    files = write_model(storage, uri, state, cfg)
    write_lineage(storage, uri, files, {"run_id": "r1"})
    return Path(uri)


def test_a_written_model_reads_back_verified(written: Path) -> None:
    assert written.name == "model" and written.parent.name == "r1"
    lineage = json.loads((written / LINEAGE_FILE).read_text())
    assert list(lineage) == ["files", "run_id"] and lineage["run_id"] == "r1"
    assert set(lineage["files"]) == {WEIGHTS_FILE, CONFIG_FILE}
    assert recorded_hashes(str(written), Storage()) == (LINEAGE_FILE, lineage["files"])

    artifact = Artifact.open(str(written), Storage())
    cfg, weights = artifact.read_model()
    assert cfg == tiny_config() == read_config(str(written), Storage())
    assert weights == (written / WEIGHTS_FILE).read_bytes()
    assert artifact.read(GRAPH_FILE) is None  # not exported, and not listed: no error


def test_a_changed_or_missing_listed_file_is_refused(written: Path) -> None:
    (written / CONFIG_FILE).write_text(tiny_config(train={"epochs": 9}).to_yaml())
    artifact = Artifact.open(str(written), Storage())
    with pytest.raises(MedsegError, match=f"{CONFIG_FILE} is not the file {LINEAGE_FILE} records"):
        artifact.read_model()
    (written / WEIGHTS_FILE).unlink()
    with pytest.raises(MedsegError, match=f"{WEIGHTS_FILE} is missing, and {LINEAGE_FILE} lists"):
        artifact.read(WEIGHTS_FILE)


def test_the_card_is_the_record_before_the_lineage(written: Path) -> None:
    (written / CARD_FILE).write_text(json.dumps({"files": {GRAPH_FILE: "0" * 64}}))
    artifact = Artifact.open(str(written), Storage())
    assert (artifact.record, artifact.hashes) == (CARD_FILE, {GRAPH_FILE: "0" * 64})
    with pytest.raises(MedsegError, match=f"{GRAPH_FILE} is missing, and {CARD_FILE} lists it"):
        artifact.read(GRAPH_FILE)
    (written / CARD_FILE).write_text(json.dumps({"files": {WEIGHTS_FILE: 1}}))
    with pytest.raises(MedsegError, match=f"{CARD_FILE} holds no valid 'files' map"):
        Artifact.open(str(written), Storage())


def test_a_folder_without_weights_is_no_artifact(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text(tiny_config().to_yaml())
    with pytest.raises(MedsegError, match=f"is not a model artifact: it has no {WEIGHTS_FILE}"):
        Artifact.open(str(tmp_path), Storage()).read_model()
    with pytest.raises(MedsegError, match="is not a model artifact"):
        read_config(str(tmp_path / "nothing"), Storage())


def test_the_dataset_a_model_was_trained_on(written: Path, tmp_path: Path) -> None:
    """The lineage names it (with the run); a registered copy's card does too; else an error."""
    dataset = {"store": "s3://b", "name": "t", "version": "v3"}
    lineage = json.loads((written / LINEAGE_FILE).read_text())
    (written / LINEAGE_FILE).write_text(json.dumps(lineage | {"dataset": dataset}))
    assert trained_on(str(written), Storage()) == TrainedOn("s3://b", "t@v3", "r1")
    card = tmp_path / "models" / "m" / "v1"
    card.mkdir(parents=True)
    (card / CARD_FILE).write_text(json.dumps({"dataset": dataset, "run_id": "r1"}))
    assert trained_on(str(card), Storage()) == TrainedOn("s3://b", "t@v3", "r1")
    with pytest.raises(MedsegError, match=r"has neither lineage\.json nor model_card\.json"):
        trained_on(str(tmp_path), Storage())
