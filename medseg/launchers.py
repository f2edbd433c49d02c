"""Training launchers: ``local`` (torchrun here) and ``pytorchjob`` (Kubeflow Training Operator).

Both run the same entrypoint, ``python -m medseg.train``, under ``torchrun``. On a cluster the
PyTorchJob has one Master and ``workers - 1`` Worker pods; the operator sets ``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT`` in every pod
(its own ``RANK``/``WORLD_SIZE`` count pods, not processes), and the container starts torchrun
from those, so several GPUs per pod each get a process. Only this module and
:mod:`medseg.deploy` know about Kubernetes.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from medseg.errors import MedsegError
from medseg.kube import DEFAULT_RELEASE, check_operator
from medseg.names import check_name

__all__ = [
    "LAUNCHERS",
    "PyTorchJobSpec",
    "S3Secret",
    "build_pytorchjob",
    "run_local",
    "submit_pytorchjob",
]

LAUNCHERS = ("local", "pytorchjob")


@dataclass(frozen=True)
class S3Secret:
    """Where pods find the object store: the chart's S3 Secret and ConfigMap (by reference).

    Attributes:
        name: Secret with the credentials (the chart's ``FULLNAME-s3``, or ``s3.existingSecret``).
        config: ConfigMap with ``S3_ENDPOINT``, ``S3_USE_HTTPS`` and ``AWS_REGION`` (the chart's
            ``FULLNAME-s3``): the endpoint is never a literal here, so it is the chart's.
        access_key_key, secret_key_key: Keys of the Secret.
    """

    name: str = DEFAULT_RELEASE.s3_secret
    config: str = DEFAULT_RELEASE.s3_config
    access_key_key: str = "AWS_ACCESS_KEY_ID"
    secret_key_key: str = "AWS_SECRET_ACCESS_KEY"

    def env(self) -> list[Any]:
        """``V1EnvVar`` list: credentials by ``secretKeyRef``, the rest by ``configMapKeyRef``."""
        from kubernetes.client import (
            V1ConfigMapKeySelector,
            V1EnvVar,
            V1EnvVarSource,
            V1SecretKeySelector,
        )

        def secret(key: str) -> V1EnvVarSource:
            return V1EnvVarSource(secret_key_ref=V1SecretKeySelector(name=self.name, key=key))

        def config(key: str) -> V1EnvVarSource:
            return V1EnvVarSource(
                config_map_key_ref=V1ConfigMapKeySelector(name=self.config, key=key)
            )

        return [
            V1EnvVar(name="AWS_ACCESS_KEY_ID", value_from=secret(self.access_key_key)),
            V1EnvVar(name="AWS_SECRET_ACCESS_KEY", value_from=secret(self.secret_key_key)),
            *(
                V1EnvVar(name=key, value_from=config(key))
                for key in ("S3_ENDPOINT", "S3_USE_HTTPS", "AWS_REGION")
            ),
        ]


@dataclass(frozen=True)
class PyTorchJobSpec:
    """Everything a training PyTorchJob needs.

    Attributes:
        name: Job name (also the run id's Kubernetes name).
        namespace: Namespace of the job (the chart's release namespace, where its Role applies).
        image: The project image (holds medseg and torch).
        dataset: ``NAME@VERSION``, preprocessed.
        store: ``s3://BUCKET``.
        run_id: Training run id (resumes if it has checkpoints).
        config_uri: ``s3://…/config.yaml`` of the run's :class:`~medseg.config.MedsegConfig`.
        workers: Pods (1 Master + ``workers - 1`` Workers).
        gpus_per_worker: GPUs per pod (0: CPU and gloo); one process per GPU.
        cpu, memory: Requests (and limits) per pod.
        shm_size: Size of the memory-backed ``/dev/shm`` (DataLoader workers share tensors there).
        max_restarts: torchrun restarts inside a pod, before the pod fails.
        backoff_limit: Pod restarts (``restartPolicy: OnFailure``) before the job fails.
        ttl_seconds: How long a finished job is kept.
        s3: Object-store access.
        service_account: The pods' ServiceAccount (the chart's pipeline ServiceAccount).
    """

    name: str
    image: str
    dataset: str
    store: str
    run_id: str
    config_uri: str
    namespace: str = DEFAULT_RELEASE.namespace
    workers: int = 2
    gpus_per_worker: int = 0
    cpu: str = "2"
    memory: str = "8Gi"
    shm_size: str = "2Gi"
    max_restarts: int = 3
    backoff_limit: int = 3
    ttl_seconds: int = 86400
    s3: S3Secret = field(default_factory=S3Secret)
    service_account: str = DEFAULT_RELEASE.pipeline_service_account

    def __post_init__(self) -> None:
        check_name(self.run_id, "run id")
        if self.workers < 1:
            raise MedsegError(f"PyTorchJob needs at least 1 worker, got {self.workers}")
        if self.gpus_per_worker < 0:
            raise MedsegError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")

    def command(self) -> list[str]:
        """The container command: torchrun from the operator's ``PET_*`` variables."""
        train = [
            "-m",
            "medseg.train",
            "--dataset",
            self.dataset,
            "--run-id",
            self.run_id,
            "--store",
            self.store,
            "--config",
            self.config_uri,
        ]
        script = (
            'exec torchrun --nnodes="$PET_NNODES" --nproc-per-node="$PET_NPROC_PER_NODE" '
            '--node-rank="$PET_NODE_RANK" --master-addr="$PET_MASTER_ADDR" '
            f'--master-port="$PET_MASTER_PORT" --max-restarts={self.max_restarts} '
            + " ".join(shlex.quote(a) for a in train)
        )
        return ["/bin/sh", "-c", script]


def build_pytorchjob(spec: PyTorchJobSpec) -> Any:
    """The ``KubeflowOrgV1PyTorchJob`` (kubeflow-training SDK model) for ``spec``."""
    from kubeflow.training import (
        KubeflowOrgV1PyTorchJob,
        KubeflowOrgV1PyTorchJobSpec,
        KubeflowOrgV1ReplicaSpec,
        KubeflowOrgV1RunPolicy,
    )
    from kubernetes.client import (
        V1Container,
        V1EmptyDirVolumeSource,
        V1ObjectMeta,
        V1PodSpec,
        V1PodTemplateSpec,
        V1Volume,
        V1VolumeMount,
    )

    from medseg.kube import (
        container_security_context,
        pod_security_context,
        resources,
        scratch_env,
        scratch_mount,
        scratch_volume,
    )

    container = V1Container(
        name="pytorch",  # the operator looks for this container name
        image=spec.image,
        command=spec.command(),
        env=[*spec.s3.env(), scratch_env()],
        resources=resources(spec.cpu, spec.memory, spec.gpus_per_worker),
        volume_mounts=[V1VolumeMount(name="dshm", mount_path="/dev/shm"), scratch_mount()],
        security_context=container_security_context(),
    )
    template = V1PodTemplateSpec(
        metadata=V1ObjectMeta(labels={"app.kubernetes.io/part-of": "medseg"}),
        spec=V1PodSpec(
            containers=[container],
            service_account_name=spec.service_account,
            volumes=[
                V1Volume(
                    name="dshm",
                    empty_dir=V1EmptyDirVolumeSource(medium="Memory", size_limit=spec.shm_size),
                ),
                scratch_volume(),
            ],
            security_context=pod_security_context(),
        ),
    )
    replicas = {
        "Master": KubeflowOrgV1ReplicaSpec(
            replicas=1, restart_policy="OnFailure", template=template
        )
    }
    if spec.workers > 1:
        replicas["Worker"] = KubeflowOrgV1ReplicaSpec(
            replicas=spec.workers - 1, restart_policy="OnFailure", template=template
        )
    return KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1",
        kind="PyTorchJob",
        metadata=V1ObjectMeta(
            name=spec.name,
            namespace=spec.namespace,
            labels={"app.kubernetes.io/part-of": "medseg", "medseg/run-id": spec.run_id},
        ),
        spec=KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(max(spec.gpus_per_worker, 1)),
            pytorch_replica_specs=replicas,
            run_policy=KubeflowOrgV1RunPolicy(
                backoff_limit=spec.backoff_limit,
                clean_pod_policy="Running",
                ttl_seconds_after_finished=spec.ttl_seconds,
            ),
        ),
    )


def _failure_reason(job: Any) -> str:
    conditions = (job.status.conditions or []) if job is not None and job.status else []
    failed = [c for c in conditions if c.type == "Failed" and c.status == "True"]
    if failed:
        return f"{failed[-1].reason}: {failed[-1].message}"
    return "no Failed condition reported"


def submit_pytorchjob(
    spec: PyTorchJobSpec,
    wait_timeout: int,
    client: Any = None,
    stream_logs: bool = True,
    poll_seconds: int = 5,
    check_version: bool = True,
) -> Any:
    """Create the job, stream the Master's logs, wait for success.

    Args:
        spec: The job.
        wait_timeout: Seconds to wait for ``Succeeded`` (the SDK's own default is 600).
        client: A ``TrainingClient`` (created from the in-cluster or kube config otherwise).
        stream_logs: Print the Master's log lines as they come.
        poll_seconds: Interval between status reads.
        check_version: Check the installed PyTorchJob CRD against the minimum Training Operator.

    Raises:
        MedsegError: When the operator is missing or too old, or the job fails (with the
            operator's reason) or times out.
    """
    from kubeflow.training import TrainingClient

    client = client or TrainingClient(namespace=spec.namespace, job_kind="PyTorchJob")
    if check_version:
        check_operator("Training Operator", client.custom_api.api_client)
    job = build_pytorchjob(spec)
    client.create_job(job=job, namespace=spec.namespace)
    if stream_logs:

        def follow() -> None:
            try:
                client.get_job_logs(
                    spec.name,
                    namespace=spec.namespace,
                    is_master=True,
                    follow=True,
                    timeout=wait_timeout,
                )
            except Exception as exc:
                print(f"[medseg] log stream ended: {exc}", file=sys.stderr)

        threading.Thread(target=follow, daemon=True).start()
    try:
        return client.wait_for_job_conditions(
            spec.name,
            namespace=spec.namespace,
            expected_conditions={"Succeeded"},
            wait_timeout=wait_timeout,
            polling_interval=poll_seconds,
        )
    except TimeoutError:
        raise MedsegError(
            f"PyTorchJob {spec.namespace}/{spec.name} did not succeed within {wait_timeout} s"
        ) from None
    except RuntimeError:
        current = client.get_job(spec.name, namespace=spec.namespace)
        raise MedsegError(
            f"PyTorchJob {spec.namespace}/{spec.name} failed: {_failure_reason(current)}"
        ) from None


def run_local(
    dataset: str,
    store: str,
    run_id: str,
    config_path: str,
    nproc: int,
    max_restarts: int = 3,
    env: dict[str, str] | None = None,
) -> None:
    """Train here: ``medseg train`` with ``nproc`` torchrun processes (gloo on CPU).

    Raises:
        MedsegError: If training fails.
    """
    check_name(run_id, "run id")  # before torchrun starts N processes that would each refuse it
    cmd = [sys.executable, "-m", "medseg", "train", "--dataset", dataset, "--run-id", run_id]
    cmd += ["--store", store, "--config", config_path, "--nproc-per-node", str(nproc)]
    cmd += ["--max-restarts", str(max_restarts)]
    done = subprocess.run(cmd, env=env, check=False)
    if done.returncode:
        raise MedsegError(f"local training run {run_id} failed (exit code {done.returncode})")
