"""The medseg pipeline: params → ingest → preprocess → train → predict → evaluate → … → deploy.

The same definition runs through ``kfp.local`` on one machine (``medseg pipeline run --local``)
and on a Kubeflow Pipelines backend (``medseg pipeline submit``). Steps hand each other typed
artifacts (``Dataset``, ``Model``, ``Metrics``, ``HTML``) that reference the data in the object
store by content (:mod:`medseg.platform.pipeline_params`). The first step checks every parameter
group and names the release's S3 Secret and ConfigMap; on a cluster every later step gets the
object-store credentials from that Secret and the endpoint from that ConfigMap (kfp-kubernetes),
CPU/memory requests and limits, its placement (node selector, tolerations, node affinity and pull
secrets of :class:`medseg.core.settings.PlacementSettings`, read when the pipeline is compiled), and
caching only where its key names its inputs' content (see ``docs/architecture.md``). Register
and deploy run only when the quality gate passes: the gate step fails the run otherwise.
"""

from types import SimpleNamespace
from typing import Any, NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Dataset, Input, Model

from components import (
    clean_shard_op,
    deploy_op,
    evaluate_op,
    gate_op,
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
from medseg.core.settings import DEFAULT_MODEL_NAME, DEFAULT_STORE, Placement, PlacementSettings
from medseg.platform.pipeline_params import ClusterParams, DeploymentParams, TrainingParams

__all__ = ["CACHED", "PIPELINE_NAME", "medseg_pipeline"]

PIPELINE_NAME = "medseg-brats"
#: Resources per step: (cpu request, cpu limit, memory request, memory limit).
RESOURCES = {
    "params": ("100m", "250m", "256Mi", "512Mi"),
    "shards": ("100m", "250m", "256Mi", "512Mi"),
    "ingest": ("1", "2", "2Gi", "4Gi"),
    "preprocess-shard": ("2", "4", "8Gi", "16Gi"),  # one pod per shard
    "preprocess": ("250m", "1", "512Mi", "1Gi"),  # the collect: reads one record per case
    "train": ("1", "2", "2Gi", "4Gi"),  # the launcher; PyTorchJob pods have their own
    "predict-shard": ("2", "4", "8Gi", "16Gi"),
    "predict": ("250m", "1", "512Mi", "1Gi"),
    "clean-shard": ("100m", "250m", "256Mi", "512Mi"),
    "evaluate": ("2", "4", "8Gi", "16Gi"),
    "gate": ("100m", "250m", "256Mi", "512Mi"),
    "register": ("500m", "1", "1Gi", "2Gi"),
    "deploy": ("250m", "500m", "512Mi", "1Gi"),
}
#: Steps KFP may answer from its cache. A KFP backend keys a step on its component (image,
#: command), its input parameter values and its input artifacts' MLMD ids; here every input
#: names its content: artifacts whose reference carries a content hash or sha256, made in
#: this run by an uncached step, and parameters (config, split, threshold) that are content.
#: Not params or gate (instant), not ingest (its source is a location whose content can change
#: under the same name; medseg.data.ingest keys its own cache on the source's content), not train
#: (a run id per run), register (a new version each time) or deploy (cluster state). The
#: shard steps are not cached either: they resume from the store, keyed on content
#: (medseg.platform.shards), and their records are deleted once the run has committed.
CACHED = {"preprocess", "predict", "evaluate"}
#: Where the steps run, as compiled: the chart's upload Job reads it from the release's ConfigMap.
PLACEMENT = PlacementSettings()
#: The release ConfigMap's placement the steps that create pods read at run time, by step: the
#: train step's launcher places the PyTorchJob, the deploy step the predictor.
PLACEMENT_ENV = {"train": "MEDSEG_PLACEMENT__TRAINING", "deploy": "MEDSEG_PLACEMENT__PREDICTOR"}
#: The parameter groups' defaults (the pipeline's ``dict`` parameters).
TRAINING = TrainingParams().model_dump(mode="json")
CLUSTER = ClusterParams().model_dump(mode="json")
DEPLOYMENT = DeploymentParams().model_dump(mode="json")


def _place(task: Any, placement: Placement, gpus: int = 0) -> None:
    """Set what KFP can of ``placement`` on ``task`` (PlacementSettings refuses the rest)."""
    fields = placement.api_fields()
    if "nodeSelector" in fields:
        kubernetes.add_node_selector_json(task, fields["nodeSelector"])
    for toleration in fields.get("tolerations", []):
        kubernetes.add_toleration_json(task, toleration)
    if "nodeAffinity" in placement.affinity:
        kubernetes.add_node_affinity_json(task, placement.affinity["nodeAffinity"])
    if placement.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(placement.image_pull_secrets))
    if gpus:  # KServe's and the Training Operator's resource name, as a limit
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)


def _configure(task: Any, step: str, names: Any) -> Any:
    cpu_req, cpu_lim, mem_req, mem_lim = RESOURCES[step]
    task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim)
    task.set_memory_request(mem_req).set_memory_limit(mem_lim)
    task.set_caching_options(step in CACHED)
    task.set_display_name(step)
    if step == "train" and PLACEMENT.train_step_gpus:  # it trains in place: on the training pool
        _place(task, PLACEMENT.training, PLACEMENT.train_step_gpus)
    else:
        _place(task, PLACEMENT.steps)
    if names is None:  # the params step: no object store
        return task
    env = {"S3_ENDPOINT": "S3_ENDPOINT", "S3_USE_HTTPS": "S3_USE_HTTPS"}
    kubernetes.use_config_map_as_env(
        task, config_map_name=names.outputs["s3_config"], config_map_key_to_env=env
    )
    if step in PLACEMENT_ENV:  # optional: a ConfigMap of the user's own may lack it
        key = PLACEMENT_ENV[step]
        kubernetes.use_config_map_as_env(
            task,
            config_map_name=names.outputs["s3_config"],
            config_map_key_to_env={key: key},
            optional=True,
        )
    kubernetes.use_config_map_as_env(  # tracking, when the chart enables it (registry.tracking)
        task,
        config_map_name=names.outputs["s3_config"],
        config_map_key_to_env={"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"},
        optional=True,
    )
    kubernetes.use_secret_as_env(
        task,
        secret_name=names.outputs["s3_secret"],
        secret_key_to_env={
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        },
    )
    return task


def _names(s3_secret: Any, s3_config: Any) -> Any:
    """The params step's outputs as :func:`_configure` reads them, inside a sub-pipeline."""
    return SimpleNamespace(outputs={"s3_secret": s3_secret, "s3_config": s3_config})


# The fan-outs are sub-pipelines: to its parent each is one task that its dependents wait for.
# kfp.local (2.16) needs that too: a task at the root that depends on a ParallelFor is sorted
# before it fails (KeyError in its topological sort), and it runs a ParallelFor only through
# the orchestrator it picks when the root holds a loop or a condition (the cleanup loop).
@dsl.pipeline(name="preprocess-shards")
def preprocess_shards(
    dataset: Input[Dataset],
    config_yaml: str,
    shard_list: list,
    shards: int,
    s3_secret: str,
    s3_config: str,
) -> None:
    """Preprocess the dataset version in ``shards`` parallel shards (medseg.platform.shards)."""
    with dsl.ParallelFor(shard_list) as shard:
        _configure(
            preprocess_shard_op(
                dataset=dataset, config_yaml=config_yaml, shard=shard, shards=shards
            ),
            "preprocess-shard",
            _names(s3_secret, s3_config),
        )


@dsl.pipeline(name="predict-shards")
def predict_shards(
    model: Input[Model],
    dataset: Input[Dataset],
    split: str,
    shard_list: list,
    shards: int,
    s3_secret: str,
    s3_config: str,
) -> None:
    """Predict the split in ``shards`` parallel shards (medseg.platform.shards)."""
    with dsl.ParallelFor(shard_list) as shard:
        _configure(
            predict_shard_op(model=model, dataset=dataset, split=split, shard=shard, shards=shards),
            "predict-shard",
            _names(s3_secret, s3_config),
        )


class _Fan(NamedTuple):
    """What the shard steps share: the params step, the shards step's list and the count."""

    names: Any
    shard_list: Any
    shards: int

    def s3(self) -> dict[str, Any]:
        """The release's S3 Secret and ConfigMap names, as a sub-pipeline's arguments."""
        return {k: self.names.outputs[k] for k in ("s3_secret", "s3_config")}


def _preprocess(fan: _Fan, dataset: Any, run_config: Any) -> Any:
    """Preprocess in ``fan.shards`` shards, then collect; returns the ``preprocessed`` output."""
    prep_shards = preprocess_shards(
        dataset=dataset,
        config_yaml=run_config,
        shard_list=fan.shard_list,
        shards=fan.shards,
        **fan.s3(),
    )
    prep_shards.set_display_name("preprocess-shards").set_caching_options(False)
    prep = _configure(
        preprocess_op(dataset=dataset, config_yaml=run_config, shards=fan.shards),
        "preprocess",
        fan.names,
    ).after(prep_shards)
    return prep.outputs["preprocessed"]


def _train(
    names: Any, dataset: Any, preprocessed: Any, run_config: Any, training: dict, cluster: dict
) -> Any:
    """Train on the preprocessed version, as a run named after the pipeline run; the model."""
    train = _configure(
        train_op(
            dataset=dataset,
            preprocessed=preprocessed,
            config_yaml=run_config,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            training=training,
            cluster=cluster,
        ),
        "train",
        names,
    )
    return train.outputs["model"]


def _predict(fan: _Fan, model: Any, dataset: Any) -> Any:
    """Predict the validation split in shards, then collect; returns ``predictions``."""
    predict_fan = predict_shards(
        model=model,
        dataset=dataset,
        split="validation",
        shard_list=fan.shard_list,
        shards=fan.shards,
        **fan.s3(),
    )
    predict_fan.set_display_name("predict-shards").set_caching_options(False)
    predict = _configure(
        predict_op(model=model, dataset=dataset, split="validation", shards=fan.shards),
        "predict",
        fan.names,
    ).after(predict_fan)
    return predict.outputs["predictions"]


def _clean_shards(fan: _Fan, dataset: Any, preprocessed: Any, predictions: Any) -> None:
    """Delete the shards' records, once preprocess and predict have both committed."""
    with dsl.ParallelFor(fan.shard_list) as shard:
        _configure(
            clean_shard_op(
                dataset=dataset,
                preprocessed=preprocessed,
                predictions=predictions,
                shard=shard,
                shards=fan.shards,
            ),
            "clean-shard",
            fan.names,
        )


def _release(
    names: Any,
    model: Any,
    predictions: Any,
    threshold: float,
    store: str,
    model_name: str,
    deployment: dict,
    cluster: dict,
) -> None:
    """Evaluate, gate, then register and deploy (both wait for the gate to pass)."""
    evaluate = _configure(
        evaluate_op(model=model, predictions=predictions, threshold=threshold),
        "evaluate",
        names,
    )
    gate = _configure(
        gate_op(
            passed=evaluate.outputs["passed"],
            metric=evaluate.outputs["metric"],
            value=evaluate.outputs["value"],
            threshold=threshold,
        ),
        "gate",
        names,
    )
    register = _configure(
        register_op(
            model=model,
            evaluation=evaluate.outputs["evaluation"],
            store=store,
            name=model_name,
        ),
        "register",
        names,
    ).after(gate)
    _configure(
        deploy_op(
            model=register.outputs["registered"],
            name=model_name,
            deployment=deployment,
            cluster=cluster,
        ),
        "deploy",
        names,
    )


@dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
def medseg_pipeline(
    source: str,
    dataset_name: str = "brats",
    store: str = DEFAULT_STORE,
    labels: str = "",
    config_yaml: str = "",
    task: str = "",
    threshold: float = 0.8,
    model_name: str = DEFAULT_MODEL_NAME,
    training: dict = TRAINING,
    cluster: dict = CLUSTER,
    deployment: dict = DEPLOYMENT,
    shards: int = 1,
) -> None:
    """Train, evaluate, register and deploy a model of one task (BraTS segmentation by default).

    Args:
        source: Raw dataset (a folder or ``s3://`` prefix) in a layout ingest knows: BraTS
            2021/2023 or MSD Task01 volumes; HAM10000, ISIC 2018 or folder-per-class images.
        dataset_name: Dataset name in the store.
        store: ``s3://BUCKET`` for datasets, runs and models.
        labels: Label convention override (default: detected from the layout).
        config_yaml: The full :class:`medseg.config.MedsegConfig` as YAML (empty: defaults).
            One line of YAML flow style is safest: KFP copies defaults into a YAML comment.
        task: The task (:mod:`medseg.tasks`: ``brats-segmentation``,
            ``skin-lesion-classification``); the config takes its defaults. Empty: the
            config's own task.
        threshold: Quality gate on the validation value of the task's gate metric (BraTS:
            mean Dice over TC, WT, ET; skin lesions: macro ROC AUC).
        model_name: Registry name (also the InferenceService name).
        training: :class:`medseg.platform.pipeline_params.TrainingParams` (epochs, launcher,
            workers, gpus_per_worker, image, timeout).
        cluster: :class:`medseg.platform.pipeline_params.ClusterParams` (namespace, release,
            s3_secret, s3_config; the S3 names follow the release unless given).
        deployment: :class:`medseg.platform.pipeline_params.DeploymentParams` (target, image, mode,
            min_replicas, max_replicas, scale_metric, scale_target, timeout).
        shards: Preprocess and predict run as this many parallel shards (pods), by case id;
            what they write is the same for every count (:mod:`medseg.platform.shards`).
    """
    names = _configure(
        params_op(
            config_yaml=config_yaml,
            task=task,
            training=training,
            cluster=cluster,
            deployment=deployment,
        ),
        "params",
        None,
    )
    run_config = names.outputs["config_yaml"]  # of the task, its defaults filled in
    ingest = _configure(
        ingest_op(
            source=source, name=dataset_name, store=store, labels=labels, config_yaml=run_config
        ),
        "ingest",
        names,
    )
    dataset = ingest.outputs["dataset"]
    fan = _Fan(names, _configure(shards_op(shards=shards), "shards", None).output, shards)
    preprocessed = _preprocess(fan, dataset, run_config)
    model = _train(names, dataset, preprocessed, run_config, training, cluster)
    predictions = _predict(fan, model, dataset)
    _clean_shards(fan, dataset, preprocessed, predictions)
    _release(names, model, predictions, threshold, store, model_name, deployment, cluster)
