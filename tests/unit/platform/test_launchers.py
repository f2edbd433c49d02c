"""Training launchers: one entrypoint argv for every launcher, torchrun here, a PyTorchJob there."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from medseg.core.errors import MedsegError
from medseg.platform.launchers import (
    Launcher,
    PyTorchJobLauncher,
    TorchrunLauncher,
    TrainRun,
    TrainTarget,
    build_pytorchjob,
)

RUN = TrainRun("brats@0123abcd", "s3://medseg", "run-1", "s3://medseg/runs/run-1/config.yaml")


def test_both_launchers_fit_the_protocol() -> None:
    launchers: list[Launcher] = [TorchrunLauncher(), PyTorchJobLauncher(image="img")]
    assert all(callable(launcher.launch) for launcher in launchers)


def test_run_id_is_checked_before_any_process_starts() -> None:
    with pytest.raises(MedsegError, match=r"run id '\.\./up' is not allowed"):
        TrainRun("d", "s3://medseg", "../up")


def test_local_argv_is_torchrun_standalone_around_the_entrypoint() -> None:
    argv = TorchrunLauncher(nproc=2, max_restarts=1).argv(RUN)
    assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert argv[5:] == ["--max-restarts=1", *RUN.argv()]
    assert RUN.argv()[:2] == ["-m", "medseg.training.train"]
    assert TrainRun("d", "s", "r").argv()[-2:] == ["--store", "s"]  # no config: defaults


def test_pytorchjob_container_gives_torchrun_the_same_entrypoint(tmp_path: Path) -> None:
    """The pod's shell expands the operator's PET_* variables; torchrun gets them and RUN's argv.

    A stand-in ``torchrun`` on PATH prints the arguments it receives, one per line.
    """
    fake = tmp_path / "torchrun"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    odd = TrainRun("brats@0123abcd", "s3://medseg", "run-1", "s3://medseg/runs/it's here.yaml")
    job = build_pytorchjob(PyTorchJobLauncher(image="img", workers=3).spec(odd))
    (container,) = job.spec.pytorch_replica_specs["Master"].template.spec.containers
    pet = {"PET_NNODES": "3", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "0"}
    pet |= {"PET_MASTER_ADDR": "master-0", "PET_MASTER_PORT": "23456"}
    env = {**os.environ, **pet, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(container.command, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "--nnodes=3",
        "--nproc-per-node=1",
        "--node-rank=0",
        "--master-addr=master-0",
        "--master-port=23456",
        "--max-restarts=3",
        *odd.argv(),
    ]
    assert job.spec.pytorch_replica_specs["Worker"].replicas == 2


def test_pytorchjob_needs_the_config_in_the_object_store() -> None:
    launcher = PyTorchJobLauncher(image="img")
    for config in (None, "/home/me/cfg.yaml"):
        local = TrainRun(RUN.dataset, RUN.store, RUN.run_id, config)
        with pytest.raises(MedsegError, match="reads its config from the object store"):
            launcher.spec(local)
    spec = launcher.spec(RUN)
    assert (spec.name, spec.config_uri, spec.image) == ("medseg-run-1", RUN.config, "img")


def test_failed_local_run_is_one_clear_error(tmp_path: Path) -> None:
    """A real torchrun whose worker fails (no such dataset in a local store)."""
    run = TrainRun("absent", str(tmp_path / "store"), "r1")
    env = {**os.environ, "MEDSEG_ENV_FILE": str(tmp_path / "none.env"), "OMP_NUM_THREADS": "1"}
    with pytest.raises(MedsegError, match=r"training run r1 failed \(torchrun exit code 1\)"):
        TorchrunLauncher(nproc=1, max_restarts=0, env=env).launch(run)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"launcher": "slurm"}, "launcher must be one of local, pytorchjob, got 'slurm'"),
        ({"workers": 0}, "workers must be at least 1, got 0"),
        ({"gpus_per_worker": -1}, "gpus_per_worker must be >= 0, got -1"),
    ],
)
def test_train_target_refuses_bad_parameters(target: dict[str, object], message: str) -> None:
    with pytest.raises(MedsegError, match=message):
        TrainTarget(**target)  # type: ignore[arg-type]


def test_train_target_picks_its_launcher() -> None:
    local = TrainTarget("local", workers=3).launcher_for(image="img")
    assert local == TorchrunLauncher(nproc=3)
    cluster = TrainTarget("pytorchjob", workers=4, gpus_per_worker=2).launcher_for(
        "img", "ns", "sa", wait_timeout=60
    )
    assert isinstance(cluster, PyTorchJobLauncher)
    spec = cluster.spec(RUN)
    assert (spec.namespace, spec.service_account, spec.workers, spec.gpus_per_worker) == (
        "ns",
        "sa",
        4,
        2,
    )
    assert cluster.wait_timeout == 60
    # Each pod's size is the run's: a 2-core node fits a job of small pods, not of default ones.
    small = TrainTarget("pytorchjob", workers=2, cpu="500m", memory="3Gi").launcher_for("img")
    (pod,) = {str(r.template.spec.containers[0].resources) for r in build_pytorchjob(
        small.spec(RUN)).spec.pytorch_replica_specs.values()}  # fmt: skip
    assert "'cpu': '500m'" in pod and "'memory': '3Gi'" in pod
