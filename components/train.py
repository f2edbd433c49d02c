"""Train: ``medseg.train`` through a launcher — torchrun here, or a PyTorchJob on the cluster."""

from kfp.dsl import Metrics, Model, Output

from components.base import component


@component
def train_op(
    dataset_spec: str,
    store: str,
    config_yaml: str,
    epochs: int,
    run_id: str,
    launcher: str,
    workers: int,
    gpus_per_worker: int,
    image: str,
    namespace: str,
    release: str,
    s3_secret: str,
    s3_config: str,
    wait_timeout: int,
    model: Output[Model],
    metrics: Output[Metrics],
) -> str:
    """Train run ``run_id`` (resuming it if it has checkpoints); returns its model URI."""
    import yaml

    from medseg.config import MedsegConfig
    from medseg.kube import Release
    from medseg.launchers import S3Secret, TrainRun, TrainTarget
    from medseg.storage import Storage, join

    cfg = MedsegConfig.model_validate(yaml.safe_load(config_yaml) or {})
    if epochs > 0:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
    storage = Storage()
    run_prefix = join(store, "runs", run_id)
    config_uri = join(run_prefix, "config.yaml")
    storage.put_bytes(config_uri, cfg.to_yaml().encode())
    chosen = TrainTarget(launcher, workers, gpus_per_worker).launcher_for(
        image,
        namespace,
        Release(release, namespace).pipeline_service_account,
        S3Secret(name=s3_secret, config=s3_config),
        wait_timeout,
    )
    chosen.launch(TrainRun(dataset_spec, store, run_id, config_uri))
    model_uri = join(run_prefix, "model")
    lineage = storage.get_json(join(model_uri, "lineage.json"))
    best = lineage["best"]
    for key in ("dice_tc", "dice_wt", "dice_et", "dice_mean"):
        if best.get(key) is not None:
            metrics.log_metric(f"best_val_{key}", round(float(best[key]), 4))
    metrics.log_metric("best_epoch", best.get("epoch", 0))
    model.metadata.update({"uri": model_uri, "run_id": run_id, "dataset": dataset_spec})
    with open(model.path, "w") as f:
        f.write(model_uri)
    return model_uri
