"""Deploy: ``medseg.deploy`` — a KServe InferenceService, or the local ``medseg serve`` command."""

from components.base import component


@component
def deploy_op(
    model_uri: str,
    name: str,
    target: str,
    image: str,
    namespace: str,
    release: str,
    deployment_mode: str,
    min_replicas: int,
    max_replicas: int,
    scale_metric: str,
    scale_target: int,
    timeout: int,
) -> str:
    """Deploy the registered model; returns the service URL or the local command.

    ``target`` ``kserve``: create/patch the InferenceService and wait for Ready (its URL);
    ``image`` is the model server image.
    ``local``: the equivalent ``medseg serve`` command, recorded as the output.
    """
    from medseg.deploy import deploy_model, local_command
    from medseg.kube import Release

    if target == "local":
        command = local_command(model_uri, name)
        print(f"[medseg] serve this model locally with: {command}")
        return command
    if target != "kserve":
        raise ValueError(f"deploy target must be local or kserve, got {target!r}")
    return deploy_model(
        model_uri,
        name,
        Release(release, namespace),
        timeout=timeout,
        deployment_mode=deployment_mode,
        scale_metric=scale_metric,
        scale_target=scale_target,
        image=image,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
    )
