"""Params: check every parameter group first (fail fast) and name the release's S3 objects."""

from typing import NamedTuple

from components.base import component


@component
def params_op(
    config_yaml: str,
    task: str,
    training: dict,
    cluster: dict,
    deployment: dict,
) -> NamedTuple("RunParams", s3_secret=str, s3_config=str, config_yaml=str):  # type: ignore[valid-type]
    """Validate the run's config and parameter groups before any work; the S3 object names.

    The Secret and ConfigMap follow the release (``cluster.release``) unless the ``cluster``
    group names them; every later step reads the object-store settings from those two.
    ``config_yaml`` is the run's whole config, of ``task`` (its defaults filled in): the one
    config every later step reads.
    """
    from collections import namedtuple

    from medseg.platform.pipeline_params import (
        ClusterParams,
        DeploymentParams,
        TrainingParams,
        parse_config,
        parse_group,
    )

    cfg = parse_config(config_yaml, task)
    parse_group(TrainingParams, training, "training").target()
    parse_group(DeploymentParams, deployment, "deployment")
    names = parse_group(ClusterParams, cluster, "cluster").resolved()
    RunParams = namedtuple("RunParams", ["s3_secret", "s3_config", "config_yaml"])
    return RunParams(names.s3_secret, names.s3_config, cfg.to_yaml())
