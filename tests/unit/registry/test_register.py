"""The model registry: versions that concurrent writers cannot share, names checked up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.apps.minio_server import MinioServer
from medseg.core.errors import ChecksumMismatch, InvalidName, MedsegError
from medseg.core.storage import Storage, join
from medseg.registry.register import list_models, model_uri, register, resolve_model
from tests.conftest import write_run_model

_REGISTER = """
import sys
from medseg.registry.register import register
from medseg.core.storage import Storage
store, run_id, name = sys.argv[1:]
storage = Storage()
print("ready", flush=True)
sys.stdin.readline()  # all processes start registering at once
print(register(storage, store, run_id, name)["version"], flush=True)
"""


def _finished_run(
    storage: Storage, store: str, run_id: str, config: bytes = b"model: {}\n"
) -> bytes:
    """A run's model folder as training leaves it (its bytes are this run's own)."""
    return write_run_model(storage, store, run_id, config)[0]


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("bucket")
    return str(tmp_path / "store")


def test_concurrent_registrations_get_distinct_versions(
    minio_server: MinioServer, storage: Storage, store: str
) -> None:
    runs = {f"run-{i}": _finished_run(storage, store, f"run-{i}") for i in range(4)}
    env = {**os.environ, **minio_server.env(), "MEDSEG_ENV_FILE": "/nonexistent"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _REGISTER, store, run_id, "same-name"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for run_id in runs
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    versions = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        versions.append(out.strip())
    assert sorted(versions) == ["v1", "v2", "v3", "v4"]
    cards = list_models(storage, store, "same-name")
    assert [c["version"] for c in cards] == ["v1", "v2", "v3", "v4"]
    for card in cards:  # every version holds the model of the run its card names
        prefix = join(store, "models", "same-name", card["version"])
        assert storage.get_bytes(join(prefix, "model.pt")) == runs[card["run_id"]]
    assert sorted(c["run_id"] for c in cards) == sorted(runs)


def test_the_card_records_the_inference_precision(storage: Storage, store: str) -> None:
    """The served numbers depend on the precision: the card says which (f32 unless chosen)."""
    _finished_run(storage, store, "r1")
    card = register(storage, store, "r1", "m")
    assert card["inference"] == {
        "engine": "auto",
        "precision": "f32",
        "window": "volume",
        "nesting": "disjoint",
    }
    _finished_run(storage, store, "r2", b"infer: {engine: openvino, precision: bf16}\n")
    card = register(storage, store, "r2", "m")
    assert card["inference"]["precision"] == "bf16"
    stored = storage.get_json(join(store, "models", "m", card["version"], "model_card.json"))
    assert stored["inference"] == card["inference"]


def test_versions_only_grow_and_resolve(storage: Storage, store: str) -> None:
    _finished_run(storage, store, "r1")
    assert register(storage, store, "r1", "m")["version"] == "v1"
    # A registration that died after claiming v2 leaves v2 unused, never reused.
    storage.put_bytes(join(store, "models", "m", "v2", "claim.json"), b"{}")
    assert register(storage, store, "r1", "m")["version"] == "v3"
    assert resolve_model(storage, store, "m") == join(store, "models", "m", "v3")
    assert resolve_model(storage, store, "m@v1") == join(store, "models", "m", "v1")
    with pytest.raises(MedsegError, match="no version v2"):
        resolve_model(storage, store, "m@v2")


def test_model_uri_names_a_run_a_registered_version_or_a_location(
    storage: Storage, store: str, tmp_path: Path
) -> None:
    _finished_run(storage, store, "r1")
    register(storage, store, "r1", "m")
    assert model_uri(storage, store, "r1") == join(store, "runs", "r1", "model")
    assert model_uri(storage, store, "m@latest") == join(store, "models", "m", "v1")
    assert model_uri(storage, store, "s3://other/models/x/v3") == "s3://other/models/x/v3"
    assert model_uri(storage, store, str(tmp_path)) == str(tmp_path)  # a model folder
    with pytest.raises(MedsegError, match="no model 'absent' registered"):
        model_uri(storage, store, "absent@v1")


@pytest.mark.parametrize("name", ["a/b", "x@y", "../m", "m\n", "m" * 200])
def test_bad_model_names_are_refused_before_anything_is_written(
    storage: Storage, store: str, name: str
) -> None:
    _finished_run(storage, store, "r1")
    with pytest.raises(InvalidName, match=r"model name .* is not allowed: it "):
        register(storage, store, "r1", name)
    assert list(storage.list(join(store, "models"))) == []
    if "@" not in name:  # in a spec, '@' separates the version
        with pytest.raises(InvalidName):
            resolve_model(storage, store, name)


def test_bad_version_and_run_id_are_refused(storage: Storage, store: str) -> None:
    with pytest.raises(InvalidName, match=r"model version '\.\./x'"):
        resolve_model(storage, store, "m@../x")
    with pytest.raises(InvalidName, match=r"run id '\.\./r'"):
        register(storage, store, "../r", "m")


def test_a_changed_run_model_is_not_registered(storage: Storage, store: str) -> None:
    _finished_run(storage, store, "r1")
    # Overwritten after training by a writer that records no checksum.
    pt = join(store, "runs", "r1", "model", "model.pt")
    if store.startswith("s3://"):
        import io

        from medseg.core.storage import split_s3

        b, key = split_s3(pt)
        storage._s3().put_object(b, key, io.BytesIO(b"tampered"), 8)
    else:
        Path(pt).write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatch, match=r"model\.pt"):
        register(storage, store, "r1", "m")
    assert list(storage.list(join(store, "models"))) == []  # no version was taken
    assert json.loads(storage.get_bytes(join(store, "runs", "r1", "model", "lineage.json")))
