"""Train: ``medseg.training.train`` by a launcher — torchrun here, a PyTorchJob on a cluster."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import component


@component
def train_op(
    dataset: Input[Dataset],
    preprocessed: Input[Dataset],
    config_yaml: str,
    run_id: str,
    training: dict,
    cluster: dict,
    model: Output[Model],
    metrics: Output[Metrics],
) -> None:
    """Train run ``run_id`` (resuming it if it has checkpoints) on the preprocessed version."""
    import math

    from medseg.artifact.files import LINEAGE_FILE, WEIGHTS_FILE, run_model_uri
    from medseg.core.storage import Storage, join
    from medseg.platform.launchers import TrainRun
    from medseg.platform.pipeline_params import (
        ClusterParams,
        DatasetArtifact,
        ModelArtifact,
        PreprocessedArtifact,
        TrainingParams,
        check_preprocessed,
        parse_config,
        parse_group,
        read_ref,
        write_ref,
    )
    from medseg.tasks import task_of

    data = read_ref(dataset, DatasetArtifact)
    prep = read_ref(preprocessed, PreprocessedArtifact)
    params = parse_group(TrainingParams, training, "training")
    names = parse_group(ClusterParams, cluster, "cluster")
    cfg = parse_config(config_yaml)
    check_preprocessed(prep, data, cfg)
    cfg = params.configured(cfg)
    storage = Storage()
    run_prefix = join(data.store, "runs", run_id)
    config_uri = join(run_prefix, "config.yaml")
    storage.put_bytes(config_uri, cfg.to_yaml().encode())
    run = TrainRun(data.dataset, data.store, run_id, config_uri)
    params.launcher_in(names).launch(run)
    model_uri = run_model_uri(run_prefix)
    lineage = storage.get_json(join(model_uri, LINEAGE_FILE))
    best = lineage["best"]
    for key in task_of(cfg).metric_names():  # not an undefined one (the AUC of a class absent)
        if best.get(key) is not None and math.isfinite(best[key]):
            metrics.log_metric(f"best_val_{key}", round(float(best[key]), 4))
    metrics.log_metric("best_epoch", best.get("epoch", 0))
    digest = lineage["files"][WEIGHTS_FILE]
    write_ref(
        model, ModelArtifact(uri=model_uri, digest=digest, run_id=run_id, dataset=data.dataset)
    )
