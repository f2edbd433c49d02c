"""Data-parallel preprocess and predict (medseg.platform.shards) on a real MinIO.

Sharded runs write what the unsharded steps write; the assignment is deterministic; a shard
killed with SIGKILL part-way leaves its finished cases, and the rerun does only the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from medseg.apps.minio_server import MinioServer
from medseg.config import DataConfig
from medseg.core.errors import DatasetError, InvalidInput, MedsegError
from medseg.core.storage import Storage, join, split_s3
from medseg.data.ingest import ingest
from medseg.data.manifest import DatasetRef
from medseg.data.preprocess import preprocess, preprocessed_prefix
from medseg.inference.predict import predict
from medseg.platform.shards import (
    PARTS,
    assign,
    clean_shard,
    collect_predictions,
    collect_preprocessed,
    predict_shard,
    preprocess_shard,
    shard_cases,
    shard_list,
)
from tests.conftest import write_tiny_model

IDS = [f"BraTS2021_{i:05d}" for i in (7, 3, 11, 0, 5, 2, 9)]


@pytest.mark.parametrize("shards", [1, 2, 3, 7, 9])
def test_assignment_is_sorted_round_robin(shards: int) -> None:
    parts = assign(IDS, shards)
    assert len(parts) == shards
    assert sorted(c for p in parts for c in p) == sorted(IDS)  # each case exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    ordered = sorted(IDS)
    for i, part in enumerate(parts):
        assert part == ordered[i::shards]
        assert shard_cases(IDS, i, shards) == part
    # the same whatever order the cases are listed in, on every call
    assert assign(list(reversed(IDS)), shards) == parts == assign(IDS, shards)


def test_bad_shard_arguments_are_named() -> None:
    assert shard_list(3) == [0, 1, 2]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidInput, match="shards must be a whole number of at least 1"):
            shard_list(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"shard 2 is not one of 0…1"):
        shard_cases(IDS, 2, 2)
    with pytest.raises(InvalidInput, match="case ids repeated: a"):
        assign(["a", "b", "a"], 2)


def _without_time(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "created_at"}


def _keys(storage: Storage, prefix: str) -> list[str]:
    return sorted(o.uri[len(prefix) + 1 :] for o in storage.list(prefix))


def _mtimes(storage: Storage, prefix: str) -> dict[str, Any]:
    """Each object's last-modified time (the listing's, to the millisecond)."""
    bucket, key = split_s3(prefix)
    objects = storage._s3().list_objects(bucket, prefix=key + "/", recursive=True)
    return {o.object_name: o.last_modified for o in objects}


def _preprocess_sharded(
    storage: Storage, name: str, store: str, shards: int
) -> tuple[str, dict[str, Any]]:
    for shard in shard_list(shards):
        preprocess_shard(name, store, DataConfig(), shard, shards, storage=storage)
    result = collect_preprocessed(name, store, DataConfig(), shards, storage=storage)
    return result.prefix, result.index


def test_sharded_preprocess_writes_the_unsharded_index(
    synth_root: Path, storage: Storage, bucket: str
) -> None:
    ingest(str(synth_root / "brats2021"), "one", bucket, storage=storage)
    ingest(str(synth_root / "brats2021"), "two", bucket, storage=storage)
    single = preprocess("one", bucket, DataConfig(), storage=storage, progress=False)
    prefix, index = _preprocess_sharded(storage, "two", bucket, 2)
    # every entry (shape and sha256 included), the config and the convention: all but the name
    assert {k: v for k, v in _without_time(index).items() if k != "dataset"} == {
        k: v for k, v in _without_time(single.index).items() if k != "dataset"
    }
    # the shards' records go once the run has committed; then the layout is the unsharded one
    assert _keys(storage, prefix) == sorted(
        [f"{PARTS}/{c['case_id']}.json" for c in index["cases"]] + _keys(storage, single.prefix)
    )
    ref = index["dataset"]
    spec = f"{ref['name']}@{ref['version']}"
    assert sum(clean_shard(storage, spec, bucket, s, 2, preprocessed=prefix) for s in (0, 1)) == 6
    assert _keys(storage, prefix) == _keys(storage, single.prefix)
    # a committed preprocessing: shards and collect do nothing
    again = preprocess_shard("two", bucket, DataConfig(), 1, 2, storage=storage)
    assert again.computed == [] and again.reused == shard_cases(
        [c["case_id"] for c in index["cases"]], 1, 2
    )
    assert collect_preprocessed("two", bucket, DataConfig(), 2, storage=storage).processed == 0


def test_sharded_predict_writes_the_unsharded_predictions(
    synth_root: Path, storage: Storage, bucket: str, tmp_path: Path
) -> None:
    ingest(str(synth_root / "brats2021"), "p", bucket, storage=storage)
    model = str(write_tiny_model(tmp_path / "model"))
    single = predict(
        model, join(bucket, "single"), dataset="p", split="all", store=bucket, storage=storage
    )
    out = join(bucket, "sharded")
    for shard in shard_list(3):
        done = predict_shard(model, "p", "all", bucket, shard, 3, out=out, storage=storage)
        assert len(done.computed) == 2 and not done.failed
    result = collect_predictions(model, "p", "all", bucket, 3, out=out, storage=storage)
    assert result.cases == single.cases and result.failed == []
    want = storage.get_json(join(single.out, "predictions.json"))
    got = storage.get_json(join(out, "predictions.json"))
    assert _without_time(got) == _without_time(want)
    for name in ("volumes.csv", "volumes.json"):
        assert storage.get_bytes(join(out, name)) == storage.get_bytes(join(single.out, name))
    for row in got["cases"]:  # the label maps, byte for byte
        assert storage.get_bytes(join(out, row["key"])) == storage.get_bytes(
            join(single.out, row["key"])
        )
    # another model's records are not this one's: its collect finds none
    other = str(write_tiny_model(tmp_path / "other", seed=1))
    with pytest.raises(MedsegError, match=r"no shard record for 6 cases \(shard 0 of 3: "):
        collect_predictions(other, "p", "all", bucket, 3, out=out, storage=storage)
    deleted = sum(
        clean_shard(storage, "p", bucket, s, 3, predictions=out, split="all") for s in range(3)
    )
    assert deleted == 6 and _keys(storage, out) == _keys(storage, single.out)


#: A shard in a process of its own, as a pod runs it: ``python -c SHARD KIND ARGS…``.
SHARD = textwrap.dedent(
    """
    import json, sys
    from medseg.config import DataConfig
    from medseg.platform.shards import predict_shard, preprocess_shard
    kind, args = sys.argv[1], json.loads(sys.argv[2])
    if kind == "preprocess":
        preprocess_shard(args["name"], args["store"], DataConfig(), args["shard"], args["shards"])
    else:
        predict_shard(
            args["model"], args["name"], "all", args["store"], args["shard"], args["shards"],
            out=args["out"],
        )
    """
)


def _recorded(storage: Storage, parts: str) -> set[str]:
    return {o.uri.rsplit("/", 1)[-1].removesuffix(".json") for o in storage.list(parts)}


def _kill_part_way(
    minio: MinioServer, storage: Storage, kind: str, args: dict[str, Any], parts: str, log: Path
) -> set[str]:
    """Run one shard in a subprocess and SIGKILL it once it has recorded its first case.

    Returns:
        The cases recorded under ``parts`` when it died (with those recorded before it ran).
    """
    already = _recorded(storage, parts)
    env = {**os.environ, **minio.env(), "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SHARD, kind, json.dumps(args)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[3],
        )
    try:
        deadline = time.monotonic() + 600
        while not _recorded(storage, parts) - already:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the shard recorded no case in 600 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return _recorded(storage, parts)


def test_killed_preprocess_shard_reruns_only_its_missing_cases(
    synth_root: Path, minio_server: MinioServer, storage: Storage, bucket: str, tmp_path: Path
) -> None:
    ingest(str(synth_root / "brats2021"), "k", bucket, storage=storage)
    ingest(str(synth_root / "brats2021"), "ref", bucket, storage=storage)
    reference = preprocess("ref", bucket, DataConfig(), storage=storage, progress=False)
    first = preprocess_shard("k", bucket, DataConfig(), 1, 2, storage=storage)
    assert len(first.computed) == 3
    prefix = preprocessed_prefix(DatasetRef.resolve(storage, bucket, "k"), DataConfig())
    args = {"name": "k", "store": bucket, "shard": 0, "shards": 2}
    parts = join(prefix, PARTS)
    before = _kill_part_way(minio_server, storage, "preprocess", args, parts, tmp_path / "log")
    mine = set(shard_cases([c["case_id"] for c in reference.index["cases"]], 0, 2))
    survived = before & mine
    assert survived and survived != mine, "the shard was not killed part-way"
    # the collect refuses to commit half a preprocessing, naming what is missing
    with pytest.raises(DatasetError, match=r"no shard record for \d cases \(shard 0 of 2: "):
        collect_preprocessed("k", bucket, DataConfig(), 2, storage=storage)
    assert not storage.exists(join(prefix, "index.json"))
    stamps = _mtimes(storage, prefix)
    rerun = preprocess_shard("k", bucket, DataConfig(), 0, 2, storage=storage)
    assert sorted(rerun.reused) == sorted(survived)
    assert sorted(rerun.computed) == sorted(mine - survived)
    after = _mtimes(storage, prefix)
    for case_id in survived:  # the finished cases were not written again
        for key in (f"cases/{case_id}.npz", f"{PARTS}/{case_id}.json"):
            name = next(n for n in stamps if n.endswith(key))
            assert after[name] == stamps[name], key
    # the other shard's work is untouched too; the commit is the unsharded index
    assert preprocess_shard("k", bucket, DataConfig(), 1, 2, storage=storage).computed == []
    index = collect_preprocessed("k", bucket, DataConfig(), 2, storage=storage).index
    assert [c["sha256"] for c in index["cases"]] == [c["sha256"] for c in reference.index["cases"]]
    assert _without_time(index)["cases"] == reference.index["cases"]


def test_killed_predict_shard_reruns_only_its_missing_cases(
    synth_root: Path, minio_server: MinioServer, storage: Storage, bucket: str, tmp_path: Path
) -> None:
    ingest(str(synth_root / "brats2021"), "q", bucket, storage=storage)
    model = str(write_tiny_model(tmp_path / "model"))
    reference = predict(
        model, join(bucket, "ref"), dataset="q", split="all", store=bucket, storage=storage
    )
    out = join(bucket, "sharded")
    args = {"model": model, "name": "q", "store": bucket, "shard": 0, "shards": 1, "out": out}
    parts = join(out, PARTS)
    survived = _kill_part_way(minio_server, storage, "predict", args, parts, tmp_path / "log")
    everything = {c["case_id"] for c in reference.cases}
    assert survived and survived != everything, "the shard was not killed part-way"
    with pytest.raises(MedsegError, match=r"no shard record for \d cases \(shard 0 of 1: "):
        collect_predictions(model, "q", "all", bucket, 1, out=out, storage=storage)
    assert not storage.exists(join(out, "predictions.json"))
    stamps = _mtimes(storage, out)
    rerun = predict_shard(model, "q", "all", bucket, 0, 1, out=out, storage=storage)
    assert sorted(rerun.reused) == sorted(survived)
    assert sorted(rerun.computed) == sorted(everything - survived)
    after = _mtimes(storage, out)
    for case_id in survived:
        for key in (f"labels/{case_id}.nii.gz", f"{PARTS}/{case_id}.json"):
            name = next(n for n in stamps if n.endswith(key))
            assert after[name] == stamps[name], key
    result = collect_predictions(model, "q", "all", bucket, 1, out=out, storage=storage)
    assert result.cases == reference.cases
    got = storage.get_json(join(out, "predictions.json"))
    want = storage.get_json(join(reference.out, "predictions.json"))
    assert _without_time(got) == _without_time(want)
