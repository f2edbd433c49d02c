"""Kubernetes object pieces shared by the launchers and the deploy step.

The names of the chart's objects (:class:`Release`) and the minimum operator versions
(:data:`MIN_OPERATORS`, checked against the installed CRDs) live here too.

Every pod medseg creates runs as uid/gid 1000, non-root, with the ``RuntimeDefault`` seccomp
profile, no privilege escalation, no capabilities and a read-only root filesystem with a writable
``/tmp`` (an ``emptyDir``, also ``HOME``): the chart's ``podSecurityContext`` and
``securityContext`` values, which ``tests/unit/platform/test_chart.py`` keeps equal to these.
Resources are requests and limits (a limit defaults to its request), plus ``nvidia.com/gpu`` when
GPUs are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medseg.core.errors import MedsegError
from medseg.core.settings import DEFAULT_IMAGES, Placement

__all__ = [
    "DEFAULT_RELEASE",
    "MIN_OPERATORS",
    "PART_OF",
    "PIPELINE_RULES",
    "PIPELINE_SERVICE_ACCOUNT",
    "SERVER_IMAGE",
    "Release",
    "check_operator",
    "container_security_context",
    "platform_container",
    "platform_pod",
    "pod_placement",
    "pod_security_context",
    "resources",
    "role_rules",
    "scratch_env",
    "scratch_mount",
    "scratch_volume",
]

UID = 1000
#: The model server image (kserve ModelServer + medseg predictor): the chart's ``serverImage``.
SERVER_IMAGE = DEFAULT_IMAGES.server
#: The writable scratch volume of every pod (the root filesystem is read-only).
SCRATCH = "tmp"
SCRATCH_PATH = "/tmp"
#: The label of every object and pod of the platform (the chart's NetworkPolicy selects it).
PART_OF = {"app.kubernetes.io/part-of": "medseg"}


def resources(
    cpu: str,
    memory: str,
    gpus: int = 0,
    cpu_limit: str | None = None,
    memory_limit: str | None = None,
) -> Any:
    """``V1ResourceRequirements``: cpu/memory requests and limits (a limit defaults to its request).

    Raises:
        MedsegError: If a quantity does not parse or a request exceeds its limit.
    """
    from kubernetes.client import V1ResourceRequirements
    from kubernetes.utils import parse_quantity

    requests = {"cpu": cpu, "memory": memory}
    limits = {"cpu": cpu_limit or cpu, "memory": memory_limit or memory}
    for key, request in requests.items():
        try:
            over = parse_quantity(request) > parse_quantity(limits[key])
        except ValueError as exc:
            raise MedsegError(f"bad {key} quantity: {exc}") from None
        if over:
            raise MedsegError(f"{key} request {request} exceeds its limit {limits[key]}")
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return V1ResourceRequirements(requests=requests, limits=limits)


def container_security_context() -> Any:
    """``V1SecurityContext``: non-root, no privilege escalation, no capabilities, read-only root."""
    from kubernetes.client import V1Capabilities, V1SecurityContext

    return V1SecurityContext(
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        run_as_non_root=True,
        capabilities=V1Capabilities(drop=["ALL"]),
    )


def pod_security_context() -> Any:
    """``V1PodSecurityContext``: uid/gid 1000, non-root, seccomp ``RuntimeDefault``."""
    from kubernetes.client import V1PodSecurityContext, V1SeccompProfile

    return V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=UID,
        run_as_group=UID,
        fs_group=UID,
        seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
    )


#: Placement fields and the kubernetes client model each deserializes into (lists: of that model).
_PLACEMENT_MODELS = {
    "nodeSelector": ("node_selector", "dict(str, str)"),
    "tolerations": ("tolerations", "list[V1Toleration]"),
    "affinity": ("affinity", "V1Affinity"),
    "priorityClassName": ("priority_class_name", "str"),
    "topologySpreadConstraints": (
        "topology_spread_constraints",
        "list[V1TopologySpreadConstraint]",
    ),
}


def pod_placement(placement: Placement, spread: list[Any] | None = None) -> dict[str, Any]:
    """A pod spec's scheduling fields and pull secrets from ``placement``, as client models.

    The keyword arguments of ``V1PodSpec`` (and of KServe's ``V1beta1PredictorSpec``, which takes
    the same pod fields); empty fields are left out, so the object carries only what was asked.

    Args:
        placement: The workload's placement.
        spread: ``V1TopologySpreadConstraint`` objects of the workload's own, placed before
            ``placement``'s.
    """
    import json
    from types import SimpleNamespace

    from kubernetes.client import ApiClient, V1LocalObjectReference

    api, fields = ApiClient(), placement.api_fields()
    out: dict[str, Any] = {}
    for key, (name, klass) in _PLACEMENT_MODELS.items():
        if key in fields:
            out[name] = api.deserialize(SimpleNamespace(data=json.dumps(fields[key])), klass)
    if spread:
        out["topology_spread_constraints"] = [*spread, *out.get("topology_spread_constraints", [])]
    if placement.image_pull_secrets:
        out["image_pull_secrets"] = [
            V1LocalObjectReference(name=name) for name in placement.image_pull_secrets
        ]
    return out


def platform_container(volume_mounts: tuple[Any, ...] = (), **fields: Any) -> Any:
    """A ``V1Container`` as the platform runs one: hardened, with the scratch volume at ``/tmp``.

    Args:
        volume_mounts: The container's own mounts; :func:`scratch_mount` follows them.
        **fields: The other ``V1Container`` fields (its ``env`` holds :func:`scratch_env`).
    """
    from kubernetes.client import V1Container

    return V1Container(
        **fields,
        volume_mounts=[*volume_mounts, scratch_mount()],
        security_context=container_security_context(),
    )


def platform_pod(
    placement: Placement, volumes: tuple[Any, ...] = (), spread: list[Any] | None = None
) -> dict[str, Any]:
    """The pod fields of every platform pod (``V1PodSpec`` keyword arguments).

    The pod security context, the volumes (``volumes``, then :func:`scratch_volume`) and the
    placement (:func:`pod_placement`).
    """
    return {
        "security_context": pod_security_context(),
        "volumes": [*volumes, scratch_volume()],
        **pod_placement(placement, spread),
    }


def scratch_volume() -> Any:
    """``V1Volume``: the ``emptyDir`` mounted at ``/tmp`` (the root filesystem is read-only)."""
    from kubernetes.client import V1EmptyDirVolumeSource, V1Volume

    return V1Volume(name=SCRATCH, empty_dir=V1EmptyDirVolumeSource())


def scratch_mount() -> Any:
    """``V1VolumeMount`` of :func:`scratch_volume` at ``/tmp``."""
    from kubernetes.client import V1VolumeMount

    return V1VolumeMount(name=SCRATCH, mount_path=SCRATCH_PATH)


def scratch_env() -> Any:
    """``V1EnvVar`` ``HOME=/tmp``: caches under ``~`` land on the writable volume."""
    from kubernetes.client import V1EnvVar

    return V1EnvVar(name="HOME", value=SCRATCH_PATH)


@dataclass(frozen=True)
class Release:
    """The names of the objects the Helm chart ``charts/medseg`` creates for one release.

    The chart derives every name from its ``fullname`` (``_helpers.tpl``): ``fullnameOverride``
    when set, else the release name when it contains the chart's name (``nameOverride``, else
    ``medseg``), else ``RELEASE-NAME``. The launchers, the deploy step and the pipeline
    take their defaults from here, so they find the chart's objects whatever the release is
    called; ``tests/unit/platform/test_chart.py`` checks these names against ``helm template``.

    Attributes:
        name: The Helm release name.
        namespace: The release namespace: the Role, the ServiceAccounts, the S3 Secret and
            ConfigMap live there, so PyTorchJobs and InferenceServices are created there too.
        name_override: The chart's ``nameOverride``.
        fullname_override: The chart's ``fullnameOverride``.
    """

    name: str = "medseg"
    namespace: str = "medseg"
    name_override: str = ""
    fullname_override: str = ""

    @property
    def fullname(self) -> str:
        """The chart's ``medseg.fullname``."""
        if self.fullname_override:
            return self.fullname_override[:63].rstrip("-")
        chart = (self.name_override or CHART_NAME)[:63].rstrip("-")
        full = self.name if chart in self.name else f"{self.name}-{chart}"
        return full[:63].rstrip("-")

    @property
    def s3_secret(self) -> str:
        """Secret with ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (or ``existingSecret``)."""
        return f"{self.fullname}-s3"

    @property
    def s3_config(self) -> str:
        """ConfigMap with ``S3_ENDPOINT``, ``S3_USE_HTTPS``, ``AWS_REGION``."""
        return f"{self.fullname}-s3"

    @property
    def pipeline_service_account(self) -> str:
        """Runs pipeline steps and PyTorchJob pods; the chart's Role is bound to it."""
        return f"{self.fullname}-pipeline"

    @property
    def predictor_service_account(self) -> str:
        """The predictor's ServiceAccount; it lists the S3 Secret for the storage initializer."""
        return f"{self.fullname}-predictor"


#: The chart's name (``Chart.yaml``), the suffix of every object name it creates.
CHART_NAME = "medseg"
DEFAULT_RELEASE = Release()
#: The ServiceAccount the chart grants the pipeline's permissions to, for the default release:
#: pipeline runs, and the PyTorchJobs they create, run as it.
PIPELINE_SERVICE_ACCOUNT = DEFAULT_RELEASE.pipeline_service_account

#: Every Kubernetes call the launcher (kubeflow-training SDK: create the PyTorchJob, poll it, list
#: its pods, read the Master's log) and the deploy step (kserve SDK: read, create, patch, delete for
#: a deployment-mode change; the predictor's PodDisruptionBudget: read, create, patch) make, as the
#: chart's pipeline ServiceAccount: the rules of the chart's Role, one definition. ``make
#: manifests`` writes them to ``charts/medseg/files/pipeline-rules.yaml``, which the Role renders;
#: ``tests/cluster/test_cluster.py`` checks them against the API server's audit log of what the code
#: called.
PIPELINE_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("kubeflow.org", "pytorchjobs", ("create", "get")),
    ("serving.kserve.io", "inferenceservices", ("create", "get", "patch", "delete")),
    ("policy", "poddisruptionbudgets", ("create", "get", "patch")),
    ("", "pods", ("list",)),
    ("", "pods/log", ("get",)),
)


def role_rules(rules: tuple[tuple[str, str, tuple[str, ...]], ...] = PIPELINE_RULES) -> list[Any]:
    """``rules`` as a Role's ``rules`` (``apiGroups``, ``resources``, ``verbs``)."""
    return [
        {"apiGroups": [group], "resources": [resource], "verbs": list(verbs)}
        for group, resource, verbs in rules
    ]


#: Oldest operator releases medseg works with, and the field of their CRD schema that shows it:
#: KServe 0.16 renamed the deployment modes to ``Standard``/``Knative`` (its InferenceService CRD
#: gained ``spec.predictor.storageUris`` in the same release); the Training Operator 1.7 moved
#: ``nprocPerNode`` to the top of the PyTorchJob spec. Chart.yaml states the same minimums.
MIN_OPERATORS = {
    "KServe": (
        "0.16.0",
        "serving.kserve.io",
        "v1beta1",
        "InferenceService",
        "spec.predictor.storageUris",
    ),
    "Training Operator": ("1.7.0", "kubeflow.org", "v1", "PyTorchJob", "spec.nprocPerNode"),
}


def check_operator(
    operator: str,
    api_client: Any,
    minimums: dict[str, tuple[str, str, str, str, str]] = MIN_OPERATORS,
) -> None:
    """Fail clearly unless ``operator``'s CRD is installed, at the minimum version or newer.

    The installed CRD's schema is read from the API server's OpenAPI v3 document (published for
    every CRD, readable by any authenticated user, so no extra RBAC is needed).

    Args:
        operator: A key of :data:`MIN_OPERATORS`.
        api_client: A ``kubernetes.client.ApiClient`` for the cluster.
        minimums: The table to check against (:data:`MIN_OPERATORS`).

    Raises:
        MedsegError: If the CRD is missing or older than the minimum.
    """
    from kubernetes.client.exceptions import ApiException

    version, group, api_version, kind, field_path = minimums[operator]
    want = f"{operator} >= {version} is required"
    try:
        response = api_client.call_api(
            f"/openapi/v3/apis/{group}/{api_version}",
            "GET",
            auth_settings=["BearerToken"],
            response_type="object",
            _return_http_data_only=True,
            _preload_content=True,
        )
    except ApiException as exc:
        if exc.status == 404:
            raise MedsegError(
                f"{want}, but the cluster serves no {group}/{api_version} API "
                f"(no {kind} CRD installed)"
            ) from None
        raise MedsegError(
            f"cannot read the {kind} CRD's schema: {exc.status} {exc.reason}"
        ) from None
    schemas = response.get("components", {}).get("schemas", {})
    suffix = f".{api_version}.{kind}"
    schema = next((s for n, s in schemas.items() if n.endswith(suffix)), None)
    if schema is None:
        raise MedsegError(f"{want}, but the cluster has no {kind} CRD in {group}/{api_version}")
    node = schema
    for part in field_path.split("."):
        node = (node.get("properties") or {}).get(part)
        if node is None:
            raise MedsegError(
                f"{want}: the installed {kind} CRD has no {field_path} (an older release); "
                f"upgrade {operator}"
            )
