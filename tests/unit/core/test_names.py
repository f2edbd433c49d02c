"""The one naming rule for datasets, models, runs and cases, and where it is enforced."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medseg.cli import app
from medseg.core.errors import InvalidName
from medseg.core.names import MAX_LENGTH, RULE, check_name
from medseg.core.storage import Storage
from medseg.data.ingest import ingest
from medseg.data.manifest import DatasetRef


@pytest.mark.parametrize(
    "name",
    [
        "brats",
        "BraTS2021_00000",
        "BraTS-GLI-00000-000",
        "demo-segresnet",
        "a.b_c-1",
        "x" * 128,
        "8f3c2a1e-5d4b-4a3c-9e2f-1a2b3c4d5e6f",
    ],
)
def test_good_names_pass_unchanged(name: str) -> None:
    assert check_name(name, "dataset name") == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "it is empty"),
        ("../../x", "it contains a path separator"),
        ("..", "it contains '..' (path traversal)"),
        ("a..b", "it contains '..' (path traversal)"),
        ("a/b", "it contains a path separator"),
        ("a\\b", "it contains a path separator"),
        ("x@y", "it contains '@', which separates a name from its version"),
        ("bad\nname", "it contains the control character U+000A"),
        ("nul\x00", "it contains the control character U+0000"),
        ("x" * 1100, f"it is 1100 characters long (at most {MAX_LENGTH})"),
        ("a b", "it contains ' '"),
        ("café", "it contains 'é'"),
        ("-x", "it starts with '-'"),
        (".hidden", "it starts with '.'"),
    ],
)
def test_bad_names_are_refused_naming_the_rule(name: str, reason: str) -> None:
    with pytest.raises(InvalidName) as err:
        check_name(name, "model name")
    msg = str(err.value)
    assert msg.startswith("model name ") and reason in msg and RULE in msg
    assert len(msg) < 400  # an over-long name is shortened in the message


def test_traversal_in_a_local_store_writes_nothing_outside(
    synth_root: Path, storage: Storage, tmp_path: Path
) -> None:
    store = tmp_path / "a" / "b" / "store"
    with pytest.raises(InvalidName, match=r"dataset name '\.\./\.\./x'"):
        ingest(str(synth_root / "brats2021"), "../../x", str(store), storage=storage)
    assert list(tmp_path.rglob("*")) == []  # neither the store nor anything beside it


def test_dataset_refs_refuse_bad_names_and_versions(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(InvalidName, match="dataset version"):
        DatasetRef.resolve(storage, str(tmp_path), "d@../../etc")
    with pytest.raises(InvalidName, match="dataset name"):
        DatasetRef(store=str(tmp_path), name="a/b", version="0123")


def test_train_refuses_a_bad_run_id_before_reading_anything(tmp_path: Path) -> None:
    from medseg.config import MedsegConfig
    from medseg.training.train import train

    with pytest.raises(InvalidName, match="run id"):
        train("d", str(tmp_path / "no-store"), "../escape", MedsegConfig())


def test_cli_prints_one_clear_line(tmp_path: Path, synth_root: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["ingest", str(synth_root / "brats2021"), "--dataset", "x@y", "--store", str(tmp_path)],
    )
    assert result.exit_code != 0
    assert "dataset name 'x@y' is not allowed" in result.output
    assert "Traceback" not in result.output
