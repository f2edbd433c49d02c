"""Kubernetes object pieces shared by the launchers and the deploy step.

Every pod medseg creates runs as uid 1000, non-root, with the ``RuntimeDefault`` seccomp profile,
no privilege escalation and no capabilities; resources are requests equal to limits, plus
``nvidia.com/gpu`` when GPUs are asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PIPELINE_SERVICE_ACCOUNT",
    "container_security_context",
    "pod_security_context",
    "resources",
]

UID = 1000
#: The ServiceAccount the Helm chart grants the pipeline's permissions to (its values.yaml
#: ``pipeline.serviceAccount``): pipeline runs, and the PyTorchJobs they create, run as it.
PIPELINE_SERVICE_ACCOUNT = "medseg-pipeline"


def resources(cpu: str, memory: str, gpus: int = 0) -> Any:
    """``V1ResourceRequirements``: cpu/memory requests = limits, GPUs as a limit."""
    from kubernetes.client import V1ResourceRequirements

    requests = {"cpu": cpu, "memory": memory}
    limits = dict(requests)
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return V1ResourceRequirements(requests=requests, limits=limits)


def container_security_context() -> Any:
    """``V1SecurityContext``: non-root, no privilege escalation, all capabilities dropped."""
    from kubernetes.client import V1Capabilities, V1SecurityContext

    return V1SecurityContext(
        allow_privilege_escalation=False,
        capabilities=V1Capabilities(drop=["ALL"]),
        run_as_non_root=True,
        run_as_user=UID,
    )


def pod_security_context() -> Any:
    """``V1PodSecurityContext``: uid/gid 1000, non-root, seccomp ``RuntimeDefault``."""
    from kubernetes.client import V1PodSecurityContext, V1SeccompProfile

    return V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=UID,
        fs_group=UID,
        seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
    )
