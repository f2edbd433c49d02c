"""Deploy: ``medseg.platform.deploy`` — a KServe InferenceService, or a local ``medseg serve``."""

from kfp.dsl import Input, Model

from components.base import component


@component
def deploy_op(model: Input[Model], name: str, deployment: dict, cluster: dict) -> str:
    """Deploy the registered model; returns the service URL or the local command.

    ``deployment.target`` ``kserve``: create/patch the InferenceService in the release's
    namespace and wait for Ready (its URL). ``local``: the equivalent ``medseg serve`` command,
    recorded as the output.
    """
    from medseg.platform.deploy import deploy_model, local_command
    from medseg.platform.pipeline_params import (
        ClusterParams,
        DeploymentParams,
        ModelArtifact,
        parse_group,
        read_ref,
    )

    registered = read_ref(model, ModelArtifact)
    params = parse_group(DeploymentParams, deployment, "deployment")
    names = parse_group(ClusterParams, cluster, "cluster").names
    if params.target == "local":
        command = local_command(registered.uri, name)
        print(f"[medseg] serve this model locally with: {command}")
        return command
    return deploy_model(
        registered.uri,
        name,
        names,
        timeout=params.timeout,
        deployment_mode=params.mode,
        scale_metric=params.scale_metric,
        scale_target=params.scale_target,
        image=params.image,
        min_replicas=params.min_replicas,
        max_replicas=params.max_replicas,
        cpu=params.cpu,
        memory=params.memory,
        cpu_limit=params.cpu_limit,
    )
