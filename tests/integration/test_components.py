"""Every pipeline component's python function, run directly against the real MinIO.

One tiny dataset is ingested and trained on once per module (1 worker, 1 epoch, the tiny
config); each step's test reads the typed artifacts the step before it wrote, as KFP would.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

from components import (
    clean_shard_op,
    deploy_op,
    evaluate_op,
    ingest_op,
    params_op,
    predict_op,
    predict_shard_op,
    preprocess_op,
    preprocess_shard_op,
    register_op,
    shards_op,
    train_op,
)
from medseg.apps.minio_server import MinioServer
from medseg.config import MedsegConfig
from medseg.core.errors import MedsegError
from medseg.core.storage import Storage, join
from medseg.platform.pipeline_params import (
    DatasetArtifact,
    EvaluationArtifact,
    ModelArtifact,
    PredictionsArtifact,
    PreprocessedArtifact,
    read_ref,
)
from tests.conftest import tiny_config

CONFIG = tiny_config(train={"epochs": 1, "batch_size": 1}).to_yaml()


def _out(kind: type, folder: Path, name: str) -> Any:
    """An output artifact as the KFP executor hands it to a component: a local file path."""
    art = kind(name=name, uri=str(folder / name), metadata={})
    art.path = str(folder / name)
    return art


@dataclass
class World:
    """The module's store and the artifacts the steps wrote, step by step."""

    store: str
    storage: Storage
    folder: Path
    source: Path
    artifacts: dict[str, Any]


@pytest.fixture(scope="module")
def world(
    minio_server: MinioServer, synth_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("components")
    storage = Storage(minio_server.settings(retry_seconds=10))
    store = f"s3://c-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket(store)
    source = folder / "raw"
    shutil.copytree(synth_root / "brats2021", source)
    with pytest.MonkeyPatch.context() as mp:  # components read the store from the environment
        for key, value in minio_server.env().items():
            mp.setenv(key, value)
        mp.setenv("MEDSEG_ENV_FILE", str(folder / "none.env"))
        mp.setenv("MEDSEG_CACHE_DIR", str(folder / "cache"))
        mp.setenv("OMP_NUM_THREADS", "1")
        yield World(store, storage, folder, source, {})


def _step(world: World, name: str) -> Any:
    """The artifact an earlier step wrote (that step's test runs first, in file order)."""
    if name not in world.artifacts:
        pytest.skip(f"the step that writes {name} failed")
    return world.artifacts[name]


def test_params_step_checks_every_group_and_names_the_release_s3_objects() -> None:
    names = params_op.python_func(
        config_yaml=CONFIG,
        task="",
        training={"workers": 2.0},
        cluster={"release": "prod"},
        deployment={},
    )
    assert (names.s3_secret, names.s3_config) == ("prod-medseg-s3", "prod-medseg-s3")
    assert MedsegConfig.from_yaml(names.config_yaml, "out") == MedsegConfig.from_yaml(CONFIG, "in")
    # the run's task: the step hands on that task's whole config
    skin = params_op.python_func(
        config_yaml="", task="skin-lesion-classification", training={}, cluster={}, deployment={}
    )
    assert MedsegConfig.from_yaml(skin.config_yaml, "out").model.name == "DenseNet121"
    given = params_op.python_func(
        config_yaml="",
        task="",
        training={},
        cluster={"release": "prod", "s3_secret": "mine"},
        deployment={},
    )
    assert (given.s3_secret, given.s3_config) == ("mine", "prod-medseg-s3")
    bad = {"config_yaml": "", "task": "", "training": {}, "cluster": {}, "deployment": {}}
    cases = [
        ({"training": {"workers": 0}}, r"training\.workers: Input should be greater than"),
        ({"training": {"launcher": "slurm"}}, r"training\.launcher: Input should be 'local'"),
        ({"cluster": {"relase": "x"}}, r"cluster\.relase: Extra inputs are not permitted"),
        ({"deployment": {"scale_metric": "cpu"}}, r"deployment: scale_metric 'cpu' does not"),
        ({"config_yaml": "train: {epochs: 0}"}, r"config_yaml: train\.epochs: Input should be"),
        ({"task": "x-ray"}, r"task: 'x-ray' is not a task"),
    ]
    for override, message in cases:
        with pytest.raises(MedsegError, match=message):
            params_op.python_func(**{**bad, **override})


def test_ingest_writes_a_dataset_reference_naming_its_content(world: World) -> None:
    out = _out(Dataset, world.folder, "dataset")
    ingest_op.python_func(
        source=str(world.source),
        name="tiny",
        store=world.store,
        labels="",
        config_yaml=CONFIG,
        dataset=out,
    )
    ref = read_ref(out, DatasetArtifact)
    version = ref.dataset.split("@")[1]
    # the version is the manifest's content hash, and the manifest checks against it
    assert ref.digest == version and ref.cases == 6 and ref.store == world.store
    manifest = world.storage.get_json(join(ref.uri, "manifest.json"))
    assert manifest["version"] == version
    on_disk = json.loads(Path(out.path).read_text())
    assert on_disk["kind"] == "dataset" and on_disk["digest"] == version
    assert {k: out.metadata[k] for k in on_disk} == on_disk  # the metadata says the same
    world.artifacts["dataset"] = out

    # The same source again: the same reference. Changed data: another one.
    again = _out(Dataset, world.folder, "again")
    ingest_op.python_func(
        source=str(world.source), name="tiny", store=world.store, labels="", config_yaml=CONFIG,
        dataset=again,
    )  # fmt: skip
    assert read_ref(again, DatasetArtifact) == ref
    changed = world.folder / "changed"
    shutil.copytree(world.source, changed)
    shutil.rmtree(next(p for p in sorted(changed.iterdir()) if p.is_dir()))  # one case less
    other = _out(Dataset, world.folder, "other")
    ingest_op.python_func(
        source=str(changed), name="tiny", store=world.store, labels="", config_yaml=CONFIG,
        dataset=other,
    )  # fmt: skip
    other_ref = read_ref(other, DatasetArtifact)
    assert other_ref.digest != ref.digest and other_ref.dataset != ref.dataset
    assert other_ref.cases == 5


def test_shards_step_lists_the_shards_or_names_a_bad_count() -> None:
    assert shards_op.python_func(shards=3) == [0, 1, 2]
    with pytest.raises(MedsegError, match=r"bad pipeline parameter shards: .* at least 1, got 0"):
        shards_op.python_func(shards=0)


def test_preprocess_collects_its_shards_from_the_dataset_artifact(world: World) -> None:
    dataset = _step(world, "dataset")
    assert preprocess_shard_op.python_func(dataset=dataset, config_yaml=CONFIG, shard=1, shards=2)
    out = _out(Dataset, world.folder, "preprocessed")
    # a shard not done yet: the collect names it and commits nothing
    with pytest.raises(MedsegError, match=r"no shard record for 3 cases \(shard 0 of 2: "):
        preprocess_op.python_func(dataset=dataset, config_yaml=CONFIG, shards=2, preprocessed=out)
    assert preprocess_shard_op.python_func(dataset=dataset, config_yaml=CONFIG, shard=0, shards=2)
    preprocess_op.python_func(dataset=dataset, config_yaml=CONFIG, shards=2, preprocessed=out)
    ref = read_ref(out, PreprocessedArtifact)
    fingerprint = tiny_config().data.fingerprint()
    data = read_ref(world.artifacts["dataset"], DatasetArtifact)
    assert ref.digest == fingerprint and ref.dataset == data.dataset
    assert ref.uri == join(data.uri, "preprocessed", fingerprint) and ref.cases == 6
    assert world.storage.exists(join(ref.uri, "index.json"))
    assert out.metadata["processed_now"] == 6
    world.artifacts["preprocessed"] = out


def test_train_with_the_local_launcher_writes_a_model_reference(world: World) -> None:
    model = _out(Model, world.folder, "model")
    metrics = _out(Metrics, world.folder, "metrics")
    train_op.python_func(
        dataset=_step(world, "dataset"),
        preprocessed=_step(world, "preprocessed"),
        config_yaml=CONFIG,
        run_id="run-1",
        training={"workers": 1, "epochs": 1},
        cluster={},
        model=model,
        metrics=metrics,
    )
    ref = read_ref(model, ModelArtifact)
    assert ref.uri == join(world.store, "runs", "run-1", "model") and ref.run_id == "run-1"
    lineage = world.storage.get_json(join(ref.uri, "lineage.json"))
    assert (
        ref.digest
        == lineage["files"]["model.pt"]
        == world.storage.stat(join(ref.uri, "model.pt")).sha256
    )
    assert metrics.metadata["best_epoch"] == 1 and "best_val_dice_mean" in metrics.metadata
    world.artifacts["model"] = model


def test_train_refuses_a_preprocessed_artifact_of_another_config(world: World) -> None:
    other = tiny_config(data={"foreground_margin": 2}).to_yaml()
    with pytest.raises(MedsegError, match=r"is not the dataset .* data fingerprint"):
        train_op.python_func(
            dataset=_step(world, "dataset"),
            preprocessed=_step(world, "preprocessed"),
            config_yaml=other,
            run_id="run-x",
            training={"workers": 1},
            cluster={},
            model=_out(Model, world.folder, "x-model"),
            metrics=_out(Metrics, world.folder, "x-metrics"),
        )
    assert not world.storage.exists(join(world.store, "runs", "run-x", "config.yaml"))


def test_predict_and_evaluate_hand_over_typed_references(world: World) -> None:
    model = _step(world, "model")
    predictions = _out(Dataset, world.folder, "predictions")
    dataset = world.artifacts["dataset"]
    for shard in (0, 1):
        done = predict_shard_op.python_func(
            model=model, dataset=dataset, split="validation", shard=shard, shards=2
        )
        assert done == 1
    predict_op.python_func(
        model=model, dataset=dataset, split="validation", shards=2, predictions=predictions
    )
    pred = read_ref(predictions, PredictionsArtifact)
    assert pred.split == "validation" and pred.cases == 2
    assert pred.uri.startswith(join(world.store, "runs", "run-1", "predictions"))
    index = join(pred.uri, "predictions.json")
    assert pred.digest == world.storage.stat(index).sha256

    report = _out(HTML, world.folder, "report")
    metrics = _out(Metrics, world.folder, "eval-metrics")
    evaluation = _out(Artifact, world.folder, "evaluation")
    result = evaluate_op.python_func(
        model=model,
        predictions=predictions,
        threshold=0.0,
        report=report,
        metrics=metrics,
        evaluation=evaluation,
    )
    ref = read_ref(evaluation, EvaluationArtifact)
    assert (
        result.passed is True
        and ref.passed is True
        and ref.metric == result.metric == "dice_mean"
        and ref.value == result.value
    )
    scored = world.storage.get_json(join(ref.uri, "metrics.json"))
    assert scored["predictions"] == pred.uri  # it scored the predict step's label maps
    assert ref.digest == world.storage.stat(join(ref.uri, "metrics.json")).sha256
    assert "Per case (worst first)" in Path(report.path).read_text()
    assert metrics.metadata["gate_passed"] == 1
    world.artifacts["evaluation"] = evaluation
    # both commits are written: the shards' records go (6 preprocessed, 2 predicted cases)
    cleaned = [
        clean_shard_op.python_func(
            dataset=dataset,
            preprocessed=world.artifacts["preprocessed"],
            predictions=predictions,
            shard=shard,
            shards=2,
        )
        for shard in (0, 1)
    ]
    assert cleaned == [4, 4]
    assert not list(world.storage.list(join(pred.uri, "parts")))


def test_register_then_deploy_locally(world: World) -> None:
    registered = _out(Model, world.folder, "registered")
    card = _out(Markdown, world.folder, "card")
    register_op.python_func(
        model=_step(world, "model"),
        evaluation=_step(world, "evaluation"),
        store=world.store,
        name="tiny",
        registered=registered,
        card=card,
    )
    ref = read_ref(registered, ModelArtifact)
    assert ref.uri == join(world.store, "models", "tiny", "v1") and ref.version == "v1"
    model_card = world.storage.get_json(join(ref.uri, "model_card.json"))
    assert ref.digest == model_card["files"]["model.pt"] and ref.run_id == "run-1"
    assert Path(card.path).read_text().startswith("# tiny v1\n")
    command = deploy_op.python_func(
        model=registered, name="tiny", deployment={"target": "local"}, cluster={}
    )
    assert command.startswith(f"medseg serve --model {ref.uri} --name tiny")
    with pytest.raises(MedsegError, match=r"deployment\.target: Input should be 'local'"):
        deploy_op.python_func(model=registered, name="t", deployment={"target": "x"}, cluster={})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"pipeline artifact 'model' \(.*\) is missing"),
        ("{not json", r"pipeline artifact 'model' \(.*\) is not a JSON reference"),
        ('{"kind": "dataset", "uri": "s3://b/x", "digest": "d"}', "holds a 'dataset' reference"),
        ('{"kind": "model", "uri": "s3://b/x", "digest": "d"}', r"malformed: model\.run_id"),
    ],
)
def test_a_missing_or_malformed_reference_is_named(
    tmp_path: Path, content: str | None, message: str
) -> None:
    art = _out(Model, tmp_path, "model")
    if content is not None:
        Path(art.path).write_text(content)
    with pytest.raises(MedsegError, match=message):
        read_ref(art, ModelArtifact)
    with pytest.raises(MedsegError, match=message):  # as a component meets it
        deploy_op.python_func(model=art, name="t", deployment={}, cluster={})
