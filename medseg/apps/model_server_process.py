"""The model server as a process of this machine on loopback: for tests, benchmarks and the demo.

:class:`ModelServerProcess` runs the container's entrypoint (``python -m model_server``, the
command :class:`~medseg.core.settings.ServerArgs` builds) on free loopback ports, with the
lifecycle MinIO and MLflow share (:class:`~medseg.apps.local_server.LocalServer`: its own session,
an owner-only log, readiness on ``/v2/health/ready``, the process group stopped). One definition
for everything that serves a model here: the demo, the tests and the benchmarks.
:func:`write_seeded_model` writes the model artifact they serve when the weights do not matter
(inference cost and the protocol do not depend on them): freshly initialised, seeded weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg.apps.local_server import LocalServer, free_port
from medseg.config import MedsegConfig
from medseg.core.settings import DEFAULT_SERVED_NAME, ServerArgs
from medseg.tasks import task_of

__all__ = ["ModelServerProcess", "write_seeded_model"]


class ModelServerProcess(LocalServer):
    """``python -m model_server`` serving one model artifact on 127.0.0.1.

    Args:
        model_dir: The model artifact (a folder or an ``s3://`` prefix).
        log: The server's log file (created owner-only; appended to).
        model_name: The model's name in the URL.
        env: Variables for the server on top of this process's environment (for instance its
            ``MEDSEG_SERVER_*`` limits or the object store's settings).
        limits: Flags of :class:`~medseg.core.settings.ServerArgs` (``max_request_mb=4``).
    """

    name = "model-server"
    poll = 0.5
    #: A host set for a pod (``0.0.0.0``) never reaches a server of this machine: loopback only.
    unset_env = ("MEDSEG_SERVER_HOST",)

    def __init__(
        self,
        model_dir: str | Path,
        log: Path,
        model_name: str = DEFAULT_SERVED_NAME,
        env: dict[str, str] | None = None,
        **limits: Any,
    ):
        super().__init__(None, log.parent)
        self.log_path = log
        self.grpc_port = free_port()
        self.args = ServerArgs(str(model_dir), model_name, self.port, self.grpc_port, **limits)
        self.env = dict(env or {})

    @property
    def grpc(self) -> str:
        """``127.0.0.1:PORT`` of the gRPC server."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def ports(self) -> tuple[int, int]:
        """The REST and gRPC ports."""
        return self.port, self.grpc_port

    def argv(self) -> list[str]:
        """The server's command line (its limits; never a credential)."""
        return self.args.command()

    def environment(self) -> dict[str, str]:
        """The variables given at construction."""
        return self.env

    def ready_path(self) -> str:
        """The Open Inference Protocol's readiness path."""
        return "/v2/health/ready"

    def exit_reason(self) -> str:
        """The log's last lines: a failed start names its cause there, above kserve's shutdown."""
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return text[-2000:] or "(empty log)"


def write_seeded_model(folder: Path, cfg: MedsegConfig, seed: int = 0) -> Path:
    """A model artifact (``model.pt``, ``model.yaml``) of ``cfg`` with seeded initial weights.

    Args:
        folder: Where to write it (created).
        cfg: The config; its task builds the network.
        seed: The seed of the weights.

    Returns:
        ``folder``.
    """
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(task_of(cfg).build_network(cfg.model).state_dict(), folder / "model.pt")
    (folder / "model.yaml").write_text(cfg.to_yaml())
    return folder
