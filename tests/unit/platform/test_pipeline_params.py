"""The pipeline's parameter groups and its ``--param`` overrides."""

from __future__ import annotations

import dataclasses

import pytest

from medseg.core.errors import MedsegError
from medseg.core.settings import PlatformSettings
from medseg.platform.deploy import InferenceServiceSpec
from medseg.platform.kube import DEFAULT_RELEASE, Release
from medseg.platform.launchers import PyTorchJobLauncher, S3Secret, TorchrunLauncher
from medseg.platform.pipeline_params import (
    ClusterParams,
    DatasetArtifact,
    DeploymentParams,
    PreprocessedArtifact,
    TrainingParams,
    check_preprocessed,
    parse_config,
    parse_group,
    pipeline_arguments,
)
from tests.conftest import tiny_config


def test_group_defaults_are_the_single_definitions() -> None:
    spec = {f.name: f.default for f in dataclasses.fields(InferenceServiceSpec)}
    deployment = DeploymentParams()
    assert (deployment.mode, deployment.min_replicas, deployment.max_replicas) == (
        spec["deployment_mode"],
        spec["min_replicas"],
        spec["max_replicas"],
    )
    assert (deployment.scale_metric, deployment.scale_target) == (
        spec["scale_metric"],
        spec["scale_target"],
    )
    images = PlatformSettings().images
    assert deployment.image == images.server and TrainingParams().image == images.project
    cluster = ClusterParams().resolved()
    assert (cluster.namespace, cluster.release) == (DEFAULT_RELEASE.namespace, DEFAULT_RELEASE.name)
    assert (cluster.s3_secret, cluster.s3_config) == (
        DEFAULT_RELEASE.s3_secret,
        DEFAULT_RELEASE.s3_config,
    )


def test_param_overrides_set_plain_parameters_and_group_fields() -> None:
    args = pipeline_arguments(
        {"source": "s3://b/raw", "training": {"workers": 3}},
        tiny_config(),
        [
            "training.epochs=2",
            "cluster.release=prod",
            "deployment.mode=Standard",
            "deployment.scale_metric=cpu",
            "threshold=0.5",
            "dataset_name=brats",
        ],
    )
    assert args["training"] == {**TrainingParams().model_dump(), "workers": 3, "epochs": 2}
    assert args["cluster"]["release"] == "prod" and args["cluster"]["s3_secret"] == ""
    assert args["deployment"]["mode"] == "Standard" and args["deployment"]["min_replicas"] == 1
    assert args["threshold"] == 0.5 and args["dataset_name"] == "brats"
    assert args["config_yaml"] == tiny_config().to_yaml()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("training", r"--param takes KEY=VALUE or GROUP\.FIELD=VALUE"),
        ("training=2", "training is a group, set GROUP.FIELD=VALUE"),
        ("train.epochs=2", "no group 'train'"),
        ("training.epochs=two", r"training\.epochs: Input should be a valid integer"),
        ("training.gpus_per_worker=-1", r"training\.gpus_per_worker: Input should be greater"),
        ("training.cpu=two", r"training\.cpu: String should match pattern"),
        ("training.memory=8 GB", r"training\.memory: String should match pattern"),
        ("deployment.cpu=lots", r"deployment\.cpu: String should match pattern"),
        ("deployment.mode=Serverless", r"deployment\.mode: Input should be 'Knative'"),
        ("config_yaml=train: [", "config_yaml: not valid YAML at line 1"),
    ],
)
def test_a_bad_override_names_the_field(extra: str, message: str) -> None:
    with pytest.raises(MedsegError, match=message):
        pipeline_arguments({"source": "x"}, None, [extra])


def test_kfp_floats_validate_as_ints_but_fractions_do_not() -> None:
    assert parse_group(TrainingParams, {"workers": 2.0}, "training").workers == 2
    with pytest.raises(MedsegError, match=r"training\.workers: Input should be a valid integer"):
        parse_group(TrainingParams, {"workers": 2.5}, "training")


def test_the_task_parameter_makes_the_config_of_that_task() -> None:
    """``task`` alone gives the task's whole config; a config of another task is refused."""
    skin = parse_config("", "skin-lesion-classification")
    assert skin.task.kind == "skin-lesion-classification"
    assert (skin.model.name, skin.model.in_channels, skin.model.out_channels) == (
        "DenseNet121",
        3,
        7,
    )
    assert skin.data.channels == ("red", "green", "blue")
    # the params step hands this config on: it reads back as itself, without the parameter
    assert parse_config(skin.to_yaml()) == skin
    # the config's own settings stay; the task fills in only what it leaves out
    tuned = parse_config("{train: {epochs: 3}, data: {image_size: [64, 64]}}", skin.task.kind)
    assert tuned.train.epochs == 3 and tuned.data.image_size == (64, 64)
    assert tuned.model == skin.model
    assert parse_config("", "") == parse_config("", "brats-segmentation")
    with pytest.raises(MedsegError, match="config is of task brats-segmentation, not skin"):
        parse_config("{task: {kind: brats-segmentation}}", "skin-lesion-classification")
    with pytest.raises(MedsegError, match="'x-ray' is not a task"):
        parse_config("", "x-ray")


def test_the_training_group_picks_its_launcher_in_the_clusters_release() -> None:
    assert TrainingParams(workers=3).launcher_in(ClusterParams()) == TorchrunLauncher(nproc=3)
    group = TrainingParams(launcher="pytorchjob", workers=2, gpus_per_worker=1, timeout=60)
    job = group.launcher_in(ClusterParams(namespace="team", release="seg"))
    assert isinstance(job, PyTorchJobLauncher)
    release = Release("seg", "team")
    assert (job.namespace, job.service_account, job.s3) == (
        "team",
        release.pipeline_service_account,
        S3Secret(name=release.s3_secret, config=release.s3_config),
    )
    assert (job.image, job.workers, job.gpus_per_worker, job.wait_timeout) == (
        group.image,
        2,
        1,
        60,
    )
    own = group.launcher_in(ClusterParams(s3_secret="mine", s3_config="my-endpoint"))
    assert isinstance(own, PyTorchJobLauncher)
    assert (own.s3.name, own.s3.config) == ("mine", "my-endpoint")


def test_the_training_groups_epochs_override_the_configs_only_above_zero() -> None:
    cfg = tiny_config()
    assert TrainingParams().configured(cfg) == cfg
    assert TrainingParams(epochs=7).configured(cfg).train.epochs == 7
    assert cfg.train.epochs != 7  # the config given stays as it was


def test_a_preprocessed_artifact_must_be_the_datasets_by_this_config() -> None:
    cfg = tiny_config()
    data = DatasetArtifact(uri="s3://b/d", digest="v1", store="s3://b", dataset="d@v1")
    prep = PreprocessedArtifact(uri="s3://b/p", digest=cfg.data.fingerprint(), dataset="d@v1")
    check_preprocessed(prep, data, cfg)
    other = tiny_config(data={"foreground_margin": 2})
    with pytest.raises(MedsegError, match=r"is not the dataset d@v1 .* data fingerprint"):
        check_preprocessed(prep, data, other)
    with pytest.raises(MedsegError, match=r"artifact d@v2 .* is not the dataset d@v1"):
        check_preprocessed(prep.model_copy(update={"dataset": "d@v2"}), data, cfg)
