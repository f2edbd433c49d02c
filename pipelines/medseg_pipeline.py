"""The medseg pipeline: ingest → preprocess → train → predict → evaluate → gate → register → deploy.

The same definition runs through ``kfp.local`` on one machine (``medseg pipeline run --local``)
and on a Kubeflow Pipelines backend (``medseg pipeline submit``). On a cluster every step gets
the object-store credentials from the Kubernetes Secret ``s3_secret`` and the endpoint from the
ConfigMap ``s3_config`` (kfp-kubernetes), CPU/memory requests and limits, and caching only where
the step is deterministic. Register and deploy run only when the quality gate passes: the gate
step fails the run otherwise.
"""

from typing import Any

from kfp import dsl, kubernetes

from components import (
    deploy_op,
    evaluate_op,
    gate_op,
    ingest_op,
    predict_op,
    preprocess_op,
    register_op,
    train_op,
)
from components.base import IMAGE
from medseg.kube import DEFAULT_RELEASE, SERVER_IMAGE
from medseg.settings import DEFAULT_MODEL_NAME, DEFAULT_STORE

__all__ = ["PIPELINE_NAME", "medseg_pipeline"]

PIPELINE_NAME = "medseg-brats"
#: Resources per step: (cpu request, cpu limit, memory request, memory limit).
RESOURCES = {
    "ingest": ("1", "2", "2Gi", "4Gi"),
    "preprocess": ("2", "4", "8Gi", "16Gi"),
    "train": ("1", "2", "2Gi", "4Gi"),  # the launcher; PyTorchJob pods have their own
    "predict": ("2", "4", "8Gi", "16Gi"),
    "evaluate": ("2", "4", "8Gi", "16Gi"),
    "gate": ("100m", "250m", "256Mi", "512Mi"),
    "register": ("500m", "1", "1Gi", "2Gi"),
    "deploy": ("250m", "500m", "512Mi", "1Gi"),
}
#: Steps whose inputs name their content are cached (same inputs, same outputs). Not ingest:
#: its input is a folder or prefix whose content can change under the same name, so KFP's cache
#: (keyed on the input strings) would return a stale version; medseg.ingest keys its own cache
#: on the source's content instead.
CACHED = {"preprocess", "predict", "evaluate"}


def _configure(task: Any, step: str, s3_secret: Any, s3_config: Any) -> Any:
    cpu_req, cpu_lim, mem_req, mem_lim = RESOURCES[step]
    task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim)
    task.set_memory_request(mem_req).set_memory_limit(mem_lim)
    task.set_caching_options(step in CACHED)
    task.set_display_name(step)
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=s3_config,
        config_map_key_to_env={"S3_ENDPOINT": "S3_ENDPOINT", "S3_USE_HTTPS": "S3_USE_HTTPS"},
    )
    kubernetes.use_secret_as_env(
        task,
        secret_name=s3_secret,
        secret_key_to_env={
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        },
    )
    return task


@dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
def medseg_pipeline(
    source: str,
    dataset_name: str = "brats",
    store: str = DEFAULT_STORE,
    labels: str = "",
    config_yaml: str = "",
    epochs: int = 0,
    launcher: str = "local",
    workers: int = 2,
    gpus_per_worker: int = 0,
    dice_threshold: float = 0.8,
    model_name: str = DEFAULT_MODEL_NAME,
    deploy_target: str = "local",
    image: str = IMAGE,
    server_image: str = SERVER_IMAGE,
    namespace: str = DEFAULT_RELEASE.namespace,
    release: str = DEFAULT_RELEASE.name,
    s3_secret: str = DEFAULT_RELEASE.s3_secret,
    s3_config: str = DEFAULT_RELEASE.s3_config,
    train_timeout: int = 86400,
    deployment_mode: str = "Knative",
    min_replicas: int = 1,
    max_replicas: int = 3,
    scale_metric: str = "concurrency",
    scale_target: int = 1,
    deploy_timeout: int = 900,
) -> None:
    """Train, evaluate, register and deploy a BraTS segmentation model.

    Args:
        source: Raw dataset: a BraTS 2021/2023 or MSD Task01 folder (or ``s3://`` prefix).
        dataset_name: Dataset name in the store.
        store: ``s3://BUCKET`` for datasets, runs and models.
        labels: Label convention override (default: detected from the layout).
        config_yaml: The full :class:`medseg.config.MedsegConfig` as YAML (empty: defaults).
            One line of YAML flow style is safest: KFP copies defaults into a YAML comment.
        epochs: Overrides ``train.epochs`` when above 0.
        launcher: ``local`` (torchrun in the step) or ``pytorchjob``.
        workers: torchrun processes (local) or PyTorchJob pods.
        gpus_per_worker: GPUs per PyTorchJob pod (one process each).
        dice_threshold: Quality gate on the validation mean Dice of TC/WT/ET.
        model_name: Registry name (also the InferenceService name).
        deploy_target: ``local`` (record the ``medseg serve`` command) or ``kserve``.
        image: The project image, for the PyTorchJob.
        server_image: The model server image, for the predictor.
        namespace: Namespace of the PyTorchJob and the InferenceService: the Helm release's,
            where the chart's Role and ServiceAccounts are.
        release: The Helm release: its ServiceAccounts run the PyTorchJob pods and the predictor.
        s3_secret: Secret with ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``.
        s3_config: ConfigMap with ``S3_ENDPOINT`` and ``S3_USE_HTTPS`` (the Helm chart's).
        train_timeout: Seconds to wait for the PyTorchJob.
        deployment_mode: ``Knative`` or ``Standard``.
        min_replicas: Fewest predictor replicas (0 scales to zero with Knative).
        max_replicas: Most predictor replicas.
        scale_metric: concurrency or rps (Knative), cpu or memory (Standard).
        scale_target: Target of the scale metric per replica.
        deploy_timeout: Seconds to wait for the InferenceService to be Ready.
    """
    ingest = _configure(
        ingest_op(
            source=source,
            name=dataset_name,
            store=store,
            labels=labels,
            config_yaml=config_yaml,
            launcher=launcher,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
        ),
        "ingest",
        s3_secret,
        s3_config,
    )
    prep = _configure(
        preprocess_op(dataset_spec=ingest.outputs["Output"], store=store, config_yaml=config_yaml),
        "preprocess",
        s3_secret,
        s3_config,
    )
    train = _configure(
        train_op(
            dataset_spec=ingest.outputs["Output"],
            store=store,
            config_yaml=config_yaml,
            epochs=epochs,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            launcher=launcher,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            image=image,
            namespace=namespace,
            release=release,
            s3_secret=s3_secret,
            s3_config=s3_config,
            wait_timeout=train_timeout,
        ),
        "train",
        s3_secret,
        s3_config,
    ).after(prep)
    predict = _configure(
        predict_op(
            model_uri=train.outputs["Output"],
            dataset_spec=ingest.outputs["Output"],
            store=store,
            split="validation",
        ),
        "predict",
        s3_secret,
        s3_config,
    )
    evaluate = _configure(
        evaluate_op(
            model_uri=train.outputs["Output"],
            predictions=predict.outputs["predictions"],
            threshold=dice_threshold,
        ),
        "evaluate",
        s3_secret,
        s3_config,
    )
    gate = _configure(
        gate_op(
            passed=evaluate.outputs["passed"],
            dice_mean=evaluate.outputs["dice_mean"],
            threshold=dice_threshold,
        ),
        "gate",
        s3_secret,
        s3_config,
    )
    register = _configure(
        register_op(
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            store=store,
            name=model_name,
            eval_uri=evaluate.outputs["eval_uri"],
        ),
        "register",
        s3_secret,
        s3_config,
    ).after(gate)
    _configure(
        deploy_op(
            model_uri=register.outputs["Output"],
            name=model_name,
            target=deploy_target,
            image=server_image,
            namespace=namespace,
            release=release,
            deployment_mode=deployment_mode,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            scale_metric=scale_metric,
            scale_target=scale_target,
            timeout=deploy_timeout,
        ),
        "deploy",
        s3_secret,
        s3_config,
    )
