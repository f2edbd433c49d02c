"""Training launchers: ``local`` (torchrun here) and ``pytorchjob`` (Kubeflow Training Operator).

Both run the same entrypoint, ``python -m medseg.training.train``, under ``torchrun``. On a cluster
the PyTorchJob has one Master and ``workers - 1`` Worker pods; the operator sets ``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT`` in every pod
(its own ``RANK``/``WORLD_SIZE`` count pods, not processes), and the container starts torchrun
from those, so several GPUs per pod each get a process. Only this module and
:mod:`medseg.platform.deploy` know about Kubernetes.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from medseg.core.errors import MedsegError
from medseg.core.names import check_name
from medseg.core.settings import Placement, PlacementSettings
from medseg.platform.kube import (
    DEFAULT_RELEASE,
    PART_OF,
    check_operator,
    platform_container,
    platform_pod,
    resources,
    scratch_env,
)

__all__ = [
    "LAUNCHERS",
    "Launcher",
    "PyTorchJobLauncher",
    "PyTorchJobSpec",
    "S3Secret",
    "TorchrunLauncher",
    "TrainRun",
    "TrainTarget",
    "build_pytorchjob",
    "submit_pytorchjob",
    "torchrun_argv",
]

LAUNCHERS = ("local", "pytorchjob")
#: What each PyTorchJob pod requests (and is limited to) unless the run says otherwise.
DEFAULT_POD_CPU, DEFAULT_POD_MEMORY = "2", "8Gi"


#: torchrun's rendezvous in a PyTorchJob pod: from the operator's ``PET_*`` variables (a shell
#: expands them; the container runs ``/bin/sh -c``).
_PET_RENDEZVOUS = (
    '--nnodes="$PET_NNODES" --nproc-per-node="$PET_NPROC_PER_NODE" '
    '--node-rank="$PET_NODE_RANK" --master-addr="$PET_MASTER_ADDR" '
    '--master-port="$PET_MASTER_PORT"'
)


@dataclass(frozen=True)
class TrainRun:
    """One training run, as every launcher starts it: ``python -m medseg.training.train`` arguments.

    Attributes:
        dataset: ``NAME@VERSION``, preprocessed.
        store: ``s3://BUCKET`` (or a folder) of the platform.
        run_id: Run id; the same id resumes the run.
        config: The run's :class:`~medseg.config.MedsegConfig` YAML, a path or an ``s3://`` URI
            (defaults when None).
    """

    dataset: str
    store: str
    run_id: str
    config: str | None = None

    def __post_init__(self) -> None:
        check_name(self.run_id, "run id")  # before N processes start that would each refuse it

    def argv(self) -> list[str]:
        """The entrypoint and its arguments, after the interpreter (or torchrun)."""
        argv = ["-m", "medseg.training.train", "--dataset", self.dataset, "--run-id", self.run_id]
        argv += ["--store", self.store]
        return argv + (["--config", self.config] if self.config else [])


def torchrun_argv(run: TrainRun, torchrun: list[str], max_restarts: int) -> list[str]:
    """``torchrun [rendezvous options] --max-restarts=N -m medseg.training.train …``, built once.

    Args:
        run: The run.
        torchrun: The program and its rendezvous options (``--standalone --nproc-per-node N``).
        max_restarts: torchrun's restarts of the worker group after a failure.
    """
    return [*torchrun, f"--max-restarts={max_restarts}", *run.argv()]


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
            # tracking, when the chart enables it (an optional key: absent, no variable)
            V1EnvVar(
                name="MLFLOW_TRACKING_URI",
                value_from=V1EnvVarSource(
                    config_map_key_ref=V1ConfigMapKeySelector(
                        name=self.config, key="MLFLOW_TRACKING_URI", optional=True
                    )
                ),
            ),
        ]


def _training_placement() -> Placement:
    return PlacementSettings().training


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
        placement: Where the master and worker pods run (node selector, tolerations, affinity,
            priority class, topology spread, pull secrets); default
            ``MEDSEG_PLACEMENT__TRAINING`` (:class:`~medseg.core.settings.PlacementSettings`).
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
    cpu: str = DEFAULT_POD_CPU
    memory: str = DEFAULT_POD_MEMORY
    shm_size: str = "2Gi"
    max_restarts: int = 3
    backoff_limit: int = 3
    ttl_seconds: int = 86400
    s3: S3Secret = field(default_factory=S3Secret)
    service_account: str = DEFAULT_RELEASE.pipeline_service_account
    placement: Placement = field(default_factory=_training_placement)

    def __post_init__(self) -> None:
        check_name(self.run_id, "run id")
        if self.workers < 1:
            raise MedsegError(f"PyTorchJob needs at least 1 worker, got {self.workers}")
        if self.gpus_per_worker < 0:
            raise MedsegError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")

    def command(self) -> list[str]:
        """The container command: torchrun from the operator's ``PET_*`` variables."""
        run = TrainRun(self.dataset, self.store, self.run_id, self.config_uri)
        program, *rest = torchrun_argv(run, ["torchrun"], self.max_restarts)
        script = " ".join(["exec", program, _PET_RENDEZVOUS, *map(shlex.quote, rest)])
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
        V1EmptyDirVolumeSource,
        V1ObjectMeta,
        V1PodSpec,
        V1PodTemplateSpec,
        V1Volume,
        V1VolumeMount,
    )

    container = platform_container(
        (V1VolumeMount(name="dshm", mount_path="/dev/shm"),),
        name="pytorch",  # the operator looks for this container name
        image=spec.image,
        command=spec.command(),
        env=[*spec.s3.env(), scratch_env()],
        resources=resources(spec.cpu, spec.memory, spec.gpus_per_worker),
    )
    shm = V1EmptyDirVolumeSource(medium="Memory", size_limit=spec.shm_size)
    template = V1PodTemplateSpec(
        metadata=V1ObjectMeta(labels=dict(PART_OF)),
        spec=V1PodSpec(
            containers=[container],
            service_account_name=spec.service_account,
            **platform_pod(spec.placement, (V1Volume(name="dshm", empty_dir=shm),)),
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
            labels={**PART_OF, "medseg/run-id": spec.run_id},
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


@dataclass(frozen=True)
class TrainTarget:
    """Where a run trains and how wide: the pipeline's launch parameters, checked together.

    Attributes:
        launcher: One of :data:`LAUNCHERS`: ``local`` (torchrun here) or ``pytorchjob``.
        workers: torchrun processes (local) or PyTorchJob pods.
        gpus_per_worker: GPUs per pod (one process each; 0: CPU and gloo).
        cpu, memory: What each PyTorchJob pod requests and is limited to (Kubernetes
            quantities; ``local`` ignores them).

    Raises:
        MedsegError: On an unknown launcher, fewer than one worker or negative GPUs.
    """

    launcher: str = "local"
    workers: int = 2
    gpus_per_worker: int = 0
    cpu: str = DEFAULT_POD_CPU
    memory: str = DEFAULT_POD_MEMORY

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise MedsegError(
                f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}"
            )
        if self.workers < 1:
            raise MedsegError(f"workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker < 0:
            raise MedsegError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")

    def launcher_for(
        self,
        image: str,
        namespace: str = DEFAULT_RELEASE.namespace,
        service_account: str = DEFAULT_RELEASE.pipeline_service_account,
        s3: S3Secret | None = None,
        wait_timeout: int = 86400,
    ) -> Launcher:
        """The launcher of this target (the cluster's arguments serve ``pytorchjob`` only)."""
        if self.launcher == "local":
            return TorchrunLauncher(nproc=self.workers)
        return PyTorchJobLauncher(
            image=image,
            namespace=namespace,
            service_account=service_account,
            workers=self.workers,
            gpus_per_worker=self.gpus_per_worker,
            cpu=self.cpu,
            memory=self.memory,
            s3=s3 or S3Secret(),
            wait_timeout=wait_timeout,
        )


class Launcher(Protocol):
    """Starts a training run somewhere and returns when it succeeded.

    Every launcher runs the same entrypoint (:meth:`TrainRun.argv`) under torchrun; what differs
    is where the processes run. Implementations: :class:`TorchrunLauncher` (here),
    :class:`PyTorchJobLauncher` (Training Operator v1); a Kubeflow Trainer v2 ``TrainJob``
    launcher fits the same protocol.
    """

    def launch(self, run: TrainRun) -> None:
        """Run ``run`` to its end.

        Raises:
            MedsegError: If the run fails.
        """


@dataclass(frozen=True)
class TorchrunLauncher:
    """Train on this machine: ``nproc`` torchrun processes (gloo on CPU, NCCL on GPUs).

    Attributes:
        nproc: Processes.
        max_restarts: torchrun's restarts of the worker group after a failure.
        env: The processes' environment (default: this process's).
    """

    nproc: int = 1
    max_restarts: int = 3
    env: dict[str, str] | None = None

    def argv(self, run: TrainRun) -> list[str]:
        """The command line: torchrun (as a module of this interpreter), standalone."""
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        return torchrun_argv(run, [*torchrun, f"--nproc-per-node={self.nproc}"], self.max_restarts)

    def launch(self, run: TrainRun) -> None:
        """Run torchrun and wait for it.

        Raises:
            MedsegError: If training fails.
        """
        rc = subprocess.call(self.argv(run), env=self.env)
        if rc:
            raise MedsegError(f"training run {run.run_id} failed (torchrun exit code {rc})")


@dataclass(frozen=True)
class PyTorchJobLauncher:
    """Train on the cluster: a PyTorchJob (see :func:`build_pytorchjob`), waited for.

    Attributes:
        image: The project image.
        namespace: Namespace of the job (the Helm release's).
        service_account: The pods' ServiceAccount.
        workers: Pods.
        gpus_per_worker: GPUs per pod (one process each).
        cpu, memory: Requests (and limits) per pod.
        s3: Object-store access.
        wait_timeout: Seconds to wait for the job to succeed.
        placement: Where the job's pods run (default ``MEDSEG_PLACEMENT__TRAINING``).
    """

    image: str
    namespace: str = DEFAULT_RELEASE.namespace
    service_account: str = DEFAULT_RELEASE.pipeline_service_account
    workers: int = 2
    gpus_per_worker: int = 0
    cpu: str = DEFAULT_POD_CPU
    memory: str = DEFAULT_POD_MEMORY
    s3: S3Secret = field(default_factory=S3Secret)
    wait_timeout: int = 86400
    placement: Placement = field(default_factory=_training_placement)

    def spec(self, run: TrainRun) -> PyTorchJobSpec:
        """The job for ``run``; its config must be in the object store, where pods read it.

        Raises:
            MedsegError: If the run's config is not an ``s3://`` URI.
        """
        if run.config is None or not run.config.startswith("s3://"):
            raise MedsegError(
                f"run {run.run_id}: a PyTorchJob reads its config from the object store, "
                f"got {run.config!r} (store the config and pass its s3:// URI)"
            )
        return PyTorchJobSpec(
            name=f"medseg-{run.run_id}"[:63].lower(),
            namespace=self.namespace,
            image=self.image,
            dataset=run.dataset,
            store=run.store,
            run_id=run.run_id,
            config_uri=run.config,
            workers=self.workers,
            gpus_per_worker=self.gpus_per_worker,
            cpu=self.cpu,
            memory=self.memory,
            s3=self.s3,
            service_account=self.service_account,
            placement=self.placement,
        )

    def launch(self, run: TrainRun) -> None:
        """Create the job and wait for it (see :func:`submit_pytorchjob`)."""
        submit_pytorchjob(self.spec(run), wait_timeout=self.wait_timeout)
