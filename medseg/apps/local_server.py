"""A server process of this machine on loopback: the lifecycle MinIO and MLflow share.

:class:`LocalServer` starts a command in its own session with an owner-only log, waits until a
readiness URL answers, watches it, and stops it with its whole process group (a server's workers
included). The process gets SIGTERM when its parent dies (Linux), so a demo or test killed without
running its ``finally`` leaves no server behind holding a port and a data folder.
:mod:`medseg.apps.minio_server` and :mod:`medseg.apps.mlflow_server` say what to run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Self

from medseg.core.errors import MedsegError

__all__ = ["DIR_MODE", "FILE_MODE", "LocalServer", "free_port", "private_dir"]

#: Owner-only modes of what holds objects, credentials or logs.
DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) readable by its owner only; tighten it if it exists.

    ``mkdir``'s mode is filtered by the umask, so the mode is set explicitly as well.
    """
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(p, DIR_MODE)
    os.chmod(path, DIR_MODE)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pdeathsig_applies() -> bool:
    """Whether to ask for the parent-death signal: on Linux, from the main thread only.

    The kernel signals the child when the *thread* that forked it ends, so a server started from
    a helper thread must not carry it.
    """
    return (
        sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
    )


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when its parent dies (Linux ``prctl``)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalServer:
    """A server process bound to 127.0.0.1: subclasses give its command, environment and probe.

    Args:
        port: The port it listens on (a free one when omitted); kept across stop and start.
        log_dir: Where its log ``<name>-<port>.log`` goes (owner-only).
    """

    #: Its name in messages and the log's file name.
    name = "server"
    #: How long to wait between readiness probes, in seconds.
    poll = 0.1
    #: Variables of this process's environment the server must not inherit.
    unset_env: tuple[str, ...] = ()

    def __init__(self, port: int | None, log_dir: Path):
        self.port = port or free_port()
        self.log_path = log_dir / f"{self.name.lower()}-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        """The command line (never a credential: any user of the machine can read it)."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """What the process gets on top of this process's environment (credentials go here)."""
        return {}

    def ready_path(self) -> str:
        """The path that answers 200 once the server serves."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Before the process starts: its folders."""

    def exit_reason(self) -> str:
        """What the log says about an exit, on one line (its last line)."""
        lines = [x.strip() for x in self.log_path.read_text(errors="replace").splitlines()]
        return ([x for x in lines if x] or ["(empty log)"])[-1][-500:]

    def start(self, timeout: float = 60.0) -> Self:
        """Start the server and wait until its readiness path answers.

        Raises:
            MedsegError: If it exits or is not ready within ``timeout`` seconds; the exit code
                and the log are named.
        """
        self.prepare()
        private_dir(self.log_path.parent)
        log = os.fdopen(  # owned by the child process
            os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE), "ab"
        )
        self._proc = subprocess.Popen(
            self.argv(),
            env={
                **{k: v for k, v in os.environ.items() if k not in self.unset_env},
                **self.environment(),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if _pdeathsig_applies() else None,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._raise_if_exited()
            if self.is_ready():
                return self
            time.sleep(self.poll)
        self.stop()
        raise MedsegError(f"{self.name} on {self.url} not ready after {timeout:.0f}s")

    def is_ready(self) -> bool:
        """Whether the server answers its readiness path."""
        try:
            with urllib.request.urlopen(self.url + self.ready_path(), timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return None if self._proc is None else self._proc.pid

    def exit_code(self) -> int | None:
        """The server's exit code once it has exited on its own; ``None`` while it runs."""
        return None if self._proc is None else self._proc.poll()

    def send_signal(self, sig: int) -> None:
        """Signal the server's own process (as the kubelet signals a container's first process)."""
        if self._proc is not None:
            self._proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait until the server exits by itself; its exit code.

        Raises:
            subprocess.TimeoutExpired: If it is still running after ``timeout`` seconds.
        """
        assert self._proc is not None, "the server was not started"
        return self._proc.wait(timeout)

    def _raise_if_exited(self) -> None:
        code = self.exit_code()
        if code is not None:
            raise MedsegError(
                f"{self.name} on {self.url} exited with code {code}: {self.exit_reason()} "
                f"(log {self.log_path})"
            )

    def run_until(self, stop: Callable[[], bool], poll: float = 0.5) -> None:
        """Keep the server until ``stop()`` is true; then stop it.

        Raises:
            MedsegError: If the server exits by itself meanwhile (its code and log are named).
        """
        try:
            while not stop():
                self._raise_if_exited()
                time.sleep(poll)
        finally:
            self.stop()

    def _signal_group(self, sig: int) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def stop(self) -> None:
        """Stop the server and its process group (SIGTERM, then SIGKILL after 15 s)."""
        if self._proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self._proc.wait()
        self._signal_group(signal.SIGKILL)  # a worker that outlived its parent
        self._proc = None

    def kill(self) -> None:
        """Kill the server and its group abruptly (SIGKILL), as a crashed or preempted pod goes."""
        if self._proc is not None:
            self._signal_group(signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
