"""Deploy a registered model as a KServe InferenceService (custom predictor).

The predictor is the medseg server image started as ``python -m model_server``; KServe's storage
initializer copies ``storageUri`` (the registered model's ``s3://`` prefix) to ``/mnt/models``
with the credentials of the ServiceAccount's S3 Secret. Autoscaling follows the deployment mode:
``Knative`` (KPA on concurrency or rps; ``min_replicas: 0`` scales to zero) or ``Standard`` (HPA on
cpu or memory). Run without a cluster, :func:`local_command` gives the equivalent
``medseg serve`` command instead.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from medseg.errors import MedsegError

__all__ = ["InferenceServiceSpec", "build_inference_service", "deploy", "local_command"]

_METRICS = {"Knative": ("concurrency", "rps"), "Standard": ("cpu", "memory")}


@dataclass(frozen=True)
class InferenceServiceSpec:
    """An InferenceService for one registered model version.

    Attributes:
        name: InferenceService (and model) name.
        storage_uri: ``s3://BUCKET/models/NAME/vN``.
        image: The server image.
        namespace: Target namespace.
        service_account: Carries the S3 Secret (KServe's ``serving.kserve.io/s3-*`` annotations).
        deployment_mode: ``Knative`` or ``Standard``.
        min_replicas, max_replicas: Autoscaling bounds (0 allowed with Knative).
        scale_metric: ``concurrency``/``rps`` (Knative) or ``cpu``/``memory`` (Standard).
        scale_target: Target value of the metric (per replica; percent for cpu/memory).
        container_concurrency: Hard limit of requests per replica (0: none).
        protocol: ``rest`` (port 8080) or ``grpc`` (port 8081, ``h2c``); Knative exposes one port.
        cpu, memory, gpus: Resources per replica.
        max_request_mb: The server's request limit (also its gRPC message limits).
    """

    name: str
    storage_uri: str
    image: str
    namespace: str = "kubeflow"
    service_account: str = "medseg-predictor"
    deployment_mode: str = "Knative"
    min_replicas: int = 1
    max_replicas: int = 3
    scale_metric: str = "concurrency"
    scale_target: int = 1
    container_concurrency: int = 1
    protocol: str = "rest"
    cpu: str = "2"
    memory: str = "8Gi"
    gpus: int = 0
    max_request_mb: int = 256

    def __post_init__(self) -> None:
        if self.deployment_mode not in _METRICS:
            raise MedsegError(
                f"deployment_mode must be Knative or Standard, got {self.deployment_mode!r}"
            )
        if self.scale_metric not in _METRICS[self.deployment_mode]:
            raise MedsegError(
                f"scale_metric {self.scale_metric!r} does not apply to {self.deployment_mode}: "
                f"use one of {', '.join(_METRICS[self.deployment_mode])}"
            )
        floor = 0 if self.deployment_mode == "Knative" else 1
        if not floor <= self.min_replicas <= self.max_replicas:
            raise MedsegError(
                f"need {floor} <= min_replicas <= max_replicas, got "
                f"{self.min_replicas}..{self.max_replicas} ({self.deployment_mode})"
            )
        if self.protocol not in ("rest", "grpc"):
            raise MedsegError(f"protocol must be rest or grpc, got {self.protocol!r}")
        if not self.storage_uri.startswith("s3://"):
            raise MedsegError(f"storage_uri must be an s3:// prefix, got {self.storage_uri!r}")


def _server_args(spec: InferenceServiceSpec) -> list[str]:
    pairs = {
        "--model_name": spec.name,
        "--model_dir": "/mnt/models",
        "--http_port": "8080",
        "--grpc_port": "8081",
        "--max_request_mb": str(spec.max_request_mb),
        "--max_concurrency": "1",
    }
    return [item for pair in pairs.items() for item in pair]


def build_inference_service(spec: InferenceServiceSpec) -> Any:
    """The ``V1beta1InferenceService`` (kserve SDK model) for ``spec``."""
    from kserve import V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec
    from kubernetes.client import V1Container, V1ContainerPort, V1EnvVar, V1ObjectMeta

    from medseg.kube import container_security_context, pod_security_context, resources

    port = (
        V1ContainerPort(container_port=8080, name="http1", protocol="TCP")
        if spec.protocol == "rest"
        else V1ContainerPort(container_port=8081, name="h2c", protocol="TCP")
    )
    container = V1Container(
        name="kserve-container",
        image=spec.image,
        command=["python", "-m", "model_server"],
        args=_server_args(spec),
        env=[V1EnvVar(name="STORAGE_URI", value=spec.storage_uri)],
        ports=[port],
        resources=resources(spec.cpu, spec.memory, spec.gpus),
        security_context=container_security_context(),
    )
    annotations = {"serving.kserve.io/deploymentMode": spec.deployment_mode}
    if spec.deployment_mode == "Standard":
        annotations["serving.kserve.io/autoscalerClass"] = "hpa"
    return V1beta1InferenceService(
        api_version="serving.kserve.io/v1beta1",
        kind="InferenceService",
        metadata=V1ObjectMeta(
            name=spec.name,
            namespace=spec.namespace,
            annotations=annotations,
            labels={"app.kubernetes.io/part-of": "medseg"},
        ),
        spec=V1beta1InferenceServiceSpec(
            predictor=V1beta1PredictorSpec(
                containers=[container],
                security_context=pod_security_context(),
                service_account_name=spec.service_account,
                min_replicas=spec.min_replicas,
                max_replicas=spec.max_replicas,
                scale_metric=spec.scale_metric,
                scale_target=spec.scale_target,
                container_concurrency=spec.container_concurrency,
            )
        ),
    )


def _reason(isvc: Any) -> str:
    status = isvc.get("status", {}) if isinstance(isvc, dict) else {}
    bad = [c for c in status.get("conditions", []) if c.get("status") != "True"]
    if not bad:
        return "no failing condition reported"
    return "; ".join(f"{c.get('type')}: {c.get('reason')} {c.get('message', '')}" for c in bad)


def deploy(spec: InferenceServiceSpec, timeout: int, client: Any = None) -> str:
    """Create or patch the InferenceService and wait until it is Ready.

    Returns:
        The service URL.

    Raises:
        MedsegError: If it is not Ready within ``timeout`` seconds (with KServe's reasons).
    """
    from kserve import KServeClient

    client = client or KServeClient()
    isvc = build_inference_service(spec)
    try:
        client.get(spec.name, namespace=spec.namespace)
        exists = True
    except RuntimeError:
        exists = False
    if exists:
        client.patch(spec.name, isvc, namespace=spec.namespace)
    else:
        client.create(isvc, namespace=spec.namespace)
    try:
        client.wait_isvc_ready(spec.name, namespace=spec.namespace, timeout_seconds=timeout)
    except RuntimeError:
        current = client.get(spec.name, namespace=spec.namespace)
        raise MedsegError(
            f"InferenceService {spec.namespace}/{spec.name} not Ready after {timeout} s: "
            f"{_reason(current)}"
        ) from None
    current = client.get(spec.name, namespace=spec.namespace)
    return str(current.get("status", {}).get("url", ""))


def local_command(model_uri: str, name: str, http_port: int = 8080, grpc_port: int = 8081) -> str:
    """The ``medseg serve`` command that serves ``model_uri`` here, as the service would."""
    args = ["medseg", "serve", "--model", model_uri, "--name", name]
    args += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    return " ".join(shlex.quote(a) for a in args)
