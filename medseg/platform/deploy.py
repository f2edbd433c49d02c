"""Deploy a registered model as a KServe InferenceService (custom predictor).

The predictor is the medseg server image started as ``python -m model_server``; KServe's storage
initializer copies ``storageUri`` (the registered model's ``s3://`` prefix) to ``/mnt/models``
with the credentials of the ServiceAccount's S3 Secret. Autoscaling follows the deployment mode:
``Knative`` (KPA on concurrency or rps; ``min_replicas: 0`` scales to zero) or ``Standard`` (HPA on
cpu or memory). Run without a cluster, :func:`local_command` gives the equivalent
``medseg serve`` command instead.

Disruption and shutdown: the server's ``grace_period_s``
(:class:`~medseg.core.settings.ServerLimits`) travels to it as ``MEDSEG_SERVER_GRACE_PERIOD_S`` and,
in Standard mode, is the pod's ``terminationGracePeriodSeconds``, where the replicas are also spread
over nodes; with more than one replica, :func:`build_pod_disruption_budget` lets a node drain evict
one at a time.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from medseg.core.errors import MedsegError
from medseg.core.settings import (
    DEFAULT_PORTS,
    KSERVE_MODEL_DIR,
    Placement,
    PlacementSettings,
    ServerArgs,
    ServerLimits,
)
from medseg.platform.kube import (
    DEFAULT_RELEASE,
    PART_OF,
    SERVER_IMAGE,
    Release,
    check_operator,
    platform_container,
    platform_pod,
    resources,
    scratch_env,
)

__all__ = [
    "InferenceServiceSpec",
    "build_inference_service",
    "build_pod_disruption_budget",
    "conditions_text",
    "default_scaling",
    "deploy",
    "deploy_model",
    "local_command",
]

_METRICS = {"Knative": ("concurrency", "rps"), "Standard": ("cpu", "memory")}
#: Scale targets when none is given: in-flight requests, requests/s, or utilisation percent.
_TARGETS = {"concurrency": 1, "rps": 5, "cpu": 70, "memory": 70}


def default_scaling(mode: str, metric: str | None = None) -> tuple[str, int]:
    """The scale metric (the mode's first unless given) and its default target.

    Raises:
        MedsegError: For an unknown mode or metric.
    """
    if mode not in _METRICS:
        raise MedsegError(f"deployment mode must be Knative or Standard, got {mode!r}")
    metric = metric or _METRICS[mode][0]
    if metric not in _TARGETS:
        raise MedsegError(f"scale metric must be one of {', '.join(_TARGETS)}, got {metric!r}")
    return metric, _TARGETS[metric]


def _max_request_mb() -> int:
    return ServerLimits().max_request_mb


def _grace_period_s() -> int:
    return ServerLimits().grace_period_s


def _placement() -> Placement:
    return PlacementSettings().predictor


@dataclass(frozen=True)
class InferenceServiceSpec:
    """An InferenceService for one registered model version.

    The defaults are the chart's ``inferenceService`` values (``charts/medseg/values.yaml``);
    ``tests/unit/platform/test_chart.py`` renders the chart and compares its InferenceService with
    :func:`build_inference_service`'s, field by field.

    Attributes:
        name: InferenceService (and model) name.
        storage_uri: ``s3://BUCKET/models/NAME/vN``.
        image: The server image (not the project image).
        image_pull_policy: The container's ``imagePullPolicy``.
        namespace: Target namespace (the chart's release namespace, where its Role applies).
        service_account: The chart's predictor ServiceAccount; it lists the S3 Secret
            (KServe's ``serving.kserve.io/s3-*`` annotations).
        deployment_mode: ``Knative`` or ``Standard``.
        min_replicas, max_replicas: Autoscaling bounds (0 allowed with Knative).
        scale_metric: ``concurrency``/``rps`` (Knative) or ``cpu``/``memory`` (Standard).
        scale_target: Target value of the metric (per replica; percent for cpu/memory).
        container_concurrency: Hard limit of requests per replica (0: none).
        protocol: ``rest`` (port 8080) or ``grpc`` (port 8081, ``h2c``); Knative exposes one port.
        cpu, memory, gpus: Requests per replica (GPUs: a limit).
        cpu_limit, memory_limit: Limits per replica (``None``: the request).
        max_request_mb: The server's request limit (also its gRPC message limits); default
            :class:`~medseg.core.settings.ServerLimits`'s.
        grace_period_s: Seconds between SIGTERM and the kill: the server's drain
            (``MEDSEG_SERVER_GRACE_PERIOD_S``) and, in Standard mode, the pod's
            ``terminationGracePeriodSeconds``; default
            :class:`~medseg.core.settings.ServerLimits`'s.
        placement: The predictor pods' node selector, tolerations, affinity, priority class,
            extra topology spread and pull secrets; default ``MEDSEG_PLACEMENT__PREDICTOR``
            (:class:`~medseg.core.settings.PlacementSettings`, from the chart's ConfigMap in a
            pipeline step). Knative mode takes them behind its ``kubernetes.podspec-*`` flags.
    """

    name: str
    storage_uri: str
    image: str = SERVER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    namespace: str = DEFAULT_RELEASE.namespace
    service_account: str = DEFAULT_RELEASE.predictor_service_account
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
    cpu_limit: str | None = "4"
    memory_limit: str | None = None
    max_request_mb: int = field(default_factory=_max_request_mb)
    grace_period_s: int = field(default_factory=_grace_period_s)
    placement: Placement = field(default_factory=_placement)

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
        try:  # the server's own bounds, before any API call
            ServerLimits(grace_period_s=self.grace_period_s)
        except ValueError as exc:
            raise MedsegError(f"grace_period_s={self.grace_period_s}: {exc}") from None
        self.resources()  # a request above its limit fails here, before any API call

    def resources(self) -> Any:
        """The predictor container's ``V1ResourceRequirements``."""
        return resources(self.cpu, self.memory, self.gpus, self.cpu_limit, self.memory_limit)


def _server_args(spec: InferenceServiceSpec) -> list[str]:
    """The predictor's flags: the one server command line, at KServe's model folder."""
    return ServerArgs(KSERVE_MODEL_DIR, spec.name, max_request_mb=spec.max_request_mb).argv()


def _predictor_selector(spec: InferenceServiceSpec) -> Any:
    """The predictor's pods, by the labels KServe gives them (the chart's same selector)."""
    from kubernetes.client import V1LabelSelector

    return V1LabelSelector(
        match_labels={"serving.kserve.io/inferenceservice": spec.name, "component": "predictor"}
    )


def build_pod_disruption_budget(spec: InferenceServiceSpec) -> Any | None:
    """The predictor's ``V1PodDisruptionBudget``, or None for fewer than two replicas.

    ``maxUnavailable: 1``: a node drain evicts one replica at a time, and a budget left over a
    single replica blocks nothing.
    """
    from kubernetes.client import V1ObjectMeta, V1PodDisruptionBudget, V1PodDisruptionBudgetSpec

    if spec.min_replicas <= 1:
        return None
    return V1PodDisruptionBudget(
        api_version="policy/v1",
        kind="PodDisruptionBudget",
        metadata=V1ObjectMeta(
            name=f"{spec.name}-predictor",
            namespace=spec.namespace,
            labels=dict(PART_OF),
        ),
        spec=V1PodDisruptionBudgetSpec(max_unavailable=1, selector=_predictor_selector(spec)),
    )


def build_inference_service(spec: InferenceServiceSpec) -> Any:
    """The ``V1beta1InferenceService`` (kserve SDK model) for ``spec``."""
    from kserve import V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec
    from kubernetes.client import V1ObjectMeta, V1TopologySpreadConstraint

    container = _server_container(spec)
    annotations = {"serving.kserve.io/deploymentMode": spec.deployment_mode}
    pod: dict[str, Any] = {}
    spread = []
    if spec.deployment_mode == "Standard":
        annotations["serving.kserve.io/autoscalerClass"] = "hpa"
        # Knative sets the grace from the revision's timeout, and takes topology spread only
        # behind its feature flag kubernetes.podspec-topologyspreadconstraints.
        pod["termination_grace_period_seconds"] = spec.grace_period_s
        spread = [
            V1TopologySpreadConstraint(
                max_skew=1,
                topology_key="kubernetes.io/hostname",
                when_unsatisfiable="ScheduleAnyway",
                label_selector=_predictor_selector(spec),
            )
        ]
    pod |= platform_pod(spec.placement, spread=spread)
    return V1beta1InferenceService(
        api_version="serving.kserve.io/v1beta1",
        kind="InferenceService",
        metadata=V1ObjectMeta(
            name=spec.name,
            namespace=spec.namespace,
            annotations=annotations,
            labels=dict(PART_OF),
        ),
        spec=V1beta1InferenceServiceSpec(
            predictor=V1beta1PredictorSpec(
                containers=[container],
                service_account_name=spec.service_account,
                min_replicas=spec.min_replicas,
                max_replicas=spec.max_replicas,
                scale_metric=spec.scale_metric,
                scale_target=spec.scale_target,
                container_concurrency=spec.container_concurrency,
                # Pods carry the platform label: the chart's NetworkPolicy lets them reach MinIO.
                labels=dict(PART_OF),
                **pod,
            )
        ),
    )


def _server_container(spec: InferenceServiceSpec) -> Any:
    """The predictor's ``V1Container``: the model server, its argv, port and environment."""
    from kubernetes.client import V1ContainerPort, V1EnvVar

    port = (
        V1ContainerPort(container_port=DEFAULT_PORTS.http, name="http1", protocol="TCP")
        if spec.protocol == "rest"
        else V1ContainerPort(container_port=DEFAULT_PORTS.grpc, name="h2c", protocol="TCP")
    )
    return platform_container(
        name="kserve-container",
        image=spec.image,
        image_pull_policy=spec.image_pull_policy,
        command=["python", "-m", "model_server"],
        args=_server_args(spec),
        env=[
            V1EnvVar(name="STORAGE_URI", value=spec.storage_uri),
            scratch_env(),
            V1EnvVar(name="MEDSEG_SERVER_GRACE_PERIOD_S", value=str(spec.grace_period_s)),
        ],
        ports=[port],
        resources=spec.resources(),
    )


def conditions_text(obj: Any) -> str:
    """A resource's ``status.conditions`` verbatim, one a line: ``Type=Status Reason: Message``."""
    status = obj.get("status") or {} if isinstance(obj, dict) else {}
    lines = [
        f"  {c.get('type')}={c.get('status')} {c.get('reason') or ''}: {c.get('message') or ''}"
        for c in status.get("conditions") or []
    ]
    return "\n".join(lines) if lines else "  (the controller reported no conditions)"


def _mode(isvc: dict[str, Any]) -> str | None:
    annotations = isvc.get("metadata", {}).get("annotations") or {}
    mode = annotations.get("serving.kserve.io/deploymentMode")
    return str(mode) if mode else None


def _get(client: Any, spec: InferenceServiceSpec) -> dict[str, Any] | None:
    from kserve import constants
    from kubernetes.client.exceptions import ApiException

    try:
        return dict(
            client.api_instance.get_namespaced_custom_object(
                constants.KSERVE_GROUP,
                constants.KSERVE_V1BETA1_VERSION,
                spec.namespace,
                constants.KSERVE_PLURAL_INFERENCESERVICE,
                spec.name,
            )
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise MedsegError(
            f"cannot read InferenceService {spec.namespace}/{spec.name}: {exc.status} {exc.reason}"
        ) from None


def _ready(isvc: dict[str, Any]) -> bool:
    status = isvc.get("status") or {}
    generation = isvc.get("metadata", {}).get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and observed < generation:
        return False  # the controller has not seen this spec yet
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def _apply_disruption_budget(api_client: Any, spec: InferenceServiceSpec) -> None:
    """Create or patch the predictor's PodDisruptionBudget (none for a single replica).

    A budget left from an earlier deploy with more replicas stays: over one replica,
    ``maxUnavailable: 1`` blocks no eviction.
    """
    from kubernetes.client import PolicyV1Api
    from kubernetes.client.exceptions import ApiException

    pdb = build_pod_disruption_budget(spec)
    if pdb is None:
        return
    api, name = PolicyV1Api(api_client), pdb.metadata.name
    try:
        try:
            api.read_namespaced_pod_disruption_budget(name, spec.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            api.create_namespaced_pod_disruption_budget(spec.namespace, pdb)
        else:
            api.patch_namespaced_pod_disruption_budget(name, spec.namespace, pdb)
    except ApiException as exc:
        raise MedsegError(
            f"cannot apply PodDisruptionBudget {spec.namespace}/{name}: {exc.status} {exc.reason}"
        ) from None


def _kserve_client() -> Any:
    """A ``kserve.KServeClient`` from the kube config or in-cluster.

    Raises:
        MedsegError: If there is neither.
    """
    from kserve import KServeClient
    from kubernetes.config import ConfigException

    try:
        return KServeClient()
    except ConfigException as exc:
        raise MedsegError(
            f"no Kubernetes configuration ({exc}): set KUBECONFIG, or run inside the cluster"
        ) from None


def deploy(
    spec: InferenceServiceSpec,
    timeout: float,
    client: Any = None,
    recreate: bool = False,
    poll_seconds: float = 2.0,
) -> str:
    """Create or patch the InferenceService (and its PodDisruptionBudget), wait until it is Ready.

    KServe (0.16 or newer, checked from the installed CRD) refuses to change an existing service's
    deployment mode in place; ``recreate=True`` is the deliberate path: delete the service, wait
    until it is gone, create it again (the model is unavailable in between).

    Args:
        spec: The service.
        timeout: Seconds to wait, in all, for deletion (when recreating) and readiness.
        client: A ``kserve.KServeClient`` (default: from the kube config or in-cluster).
        recreate: Delete and recreate the service when its deployment mode changes.
        poll_seconds: Interval between status reads.

    Returns:
        The service URL (``status.url``).

    Raises:
        MedsegError: KServe missing or too old; a mode change without ``recreate``; or not Ready
            within ``timeout`` seconds, with the controller's conditions verbatim.
    """
    client = client if client is not None else _kserve_client()
    check_operator("KServe", client.api_instance.api_client)
    where = f"InferenceService {spec.namespace}/{spec.name}"
    deadline = time.monotonic() + timeout
    isvc = build_inference_service(spec)
    current = _get(client, spec)
    if current is not None and _mode(current) not in (None, spec.deployment_mode):
        if not recreate:
            raise MedsegError(
                f"{where} runs in {_mode(current)} mode; KServe cannot change the deployment mode "
                f"in place (to {spec.deployment_mode}). Recreate it (medseg deploy --recreate, "
                f"or kubectl -n {spec.namespace} delete inferenceservice {spec.name} first)"
            )
        client.delete(spec.name, namespace=spec.namespace)
        while _get(client, spec) is not None:
            if time.monotonic() > deadline:
                raise MedsegError(f"{where} still being deleted after {timeout:.0f} s")
            time.sleep(poll_seconds)
        current = None
    if current is None:
        client.create(isvc, namespace=spec.namespace)
    else:
        client.patch(spec.name, isvc, namespace=spec.namespace)
    _apply_disruption_budget(client.api_instance.api_client, spec)
    while True:
        current = _get(client, spec)
        if current is not None and _ready(current):
            return str((current.get("status") or {}).get("url") or "")
        if time.monotonic() > deadline:
            raise MedsegError(
                f"{where} not Ready after {timeout:.0f} s; KServe's conditions:\n"
                + conditions_text(current)
            )
        time.sleep(poll_seconds)


def deploy_model(
    model_uri: str,
    name: str,
    release: Release = DEFAULT_RELEASE,
    *,
    timeout: float,
    deployment_mode: str = "Knative",
    scale_metric: str | None = None,
    scale_target: int | None = None,
    recreate: bool = False,
    client: Any = None,
    **options: Any,
) -> str:
    """Deploy a registered model into a chart release's namespace, as its predictor account.

    The one entry point of ``medseg deploy`` and the pipeline's deploy step.

    Args:
        model_uri: The registered model, ``s3://BUCKET/models/NAME/vN``.
        name: InferenceService (and model) name.
        release: The chart's release: its namespace and predictor ServiceAccount.
        timeout: Seconds to wait for Ready (see :func:`deploy`).
        deployment_mode: ``Knative`` or ``Standard``.
        scale_metric: Default: the mode's first (:func:`default_scaling`).
        scale_target: Default: the metric's (:func:`default_scaling`).
        recreate: Delete and recreate the service to change its deployment mode.
        client: A ``kserve.KServeClient`` (default: from the kube config or in-cluster).
        **options: Further :class:`InferenceServiceSpec` fields (image, replicas, resources);
            ``None`` keeps the field's default.

    Returns:
        The service URL.

    Raises:
        MedsegError: As :func:`deploy`, or for an invalid spec.
    """
    metric, target = default_scaling(deployment_mode, scale_metric)
    given = {key: value for key, value in options.items() if value is not None}
    spec = InferenceServiceSpec(
        name=name,
        storage_uri=model_uri,
        namespace=release.namespace,
        service_account=release.predictor_service_account,
        deployment_mode=deployment_mode,
        scale_metric=metric,
        scale_target=scale_target or target,
        **given,
    )
    return deploy(spec, timeout=timeout, client=client, recreate=recreate)


def local_command(
    model_uri: str,
    name: str,
    http_port: int = DEFAULT_PORTS.http,
    grpc_port: int = DEFAULT_PORTS.grpc,
) -> str:
    """The ``medseg serve`` command that serves ``model_uri`` here, as the service would."""
    args = ["medseg", "serve", "--model", model_uri, "--name", name]
    args += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    return " ".join(shlex.quote(a) for a in args)
