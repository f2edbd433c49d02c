"""Running a Kubeflow pipeline: compile it, run it through ``kfp.local``, or start it on a backend.

The pipeline is given by the caller (the ``medseg pipeline`` commands pass
:func:`pipelines.medseg_pipeline.medseg_pipeline`): the library never imports the pipeline
layer above it (docs/architecture.md). This module compiles a pipeline to IR YAML, runs it
through ``kfp.local`` (SubprocessRunner: every step a subprocess of this Python, with this
process's environment), or uploads and starts it on a KFP backend.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TextIO

from medseg.core.errors import MedsegError
from medseg.platform.kube import DEFAULT_RELEASE, Release

#: A ``@dsl.pipeline`` function (a KFP ``GraphComponent``): called with its arguments it runs
#: through ``kfp.local``; the compiler turns it into IR YAML.
Pipeline = Callable[..., Any]

__all__ = [
    "KfpLocalLog",
    "Pipeline",
    "StepEvents",
    "compile_pipeline",
    "run_local",
    "submit",
    "upload",
]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# kfp.local's own log lines (kfp/local/task_dispatcher.py), once their colours are stripped.
_TASK_STARTED = re.compile(r"Executing task '([^']+)'")
_TASK_FINISHED = re.compile(r"Task '([^']+)' finished with status (SUCCESS|FAILURE)")
# The last line of a Python traceback ("ValueError: …", "medseg.core.errors.DatasetError: …") or a
# medseg entry point's "error: …" line.
_ERROR_LINE = re.compile(r"^(?:[\w.]*(?:Error|Exception)|error): .+")


class StepEvents(Protocol):
    """Receives what a local pipeline run does, step by step (see :class:`KfpLocalLog`)."""

    def step_started(self, step: str) -> None:
        """A step (``ingest``, ``train``, …) started."""

    def step_finished(self, step: str, seconds: float, ok: bool) -> None:
        """A step ended, successfully or not, after ``seconds``."""

    def step_line(self, step: str, line: str) -> None:
        """A line of a step's own output (its logs, its subprocesses' logs)."""


def _step_name(task: str) -> str:
    return task.removesuffix("-op")


class KfpLocalLog(io.TextIOBase):
    """``kfp.local``'s output as a text stream: every line to ``sink``, tasks become events.

    ``kfp.local`` prints its own log lines and every task's streamed output to ``sys.stdout``;
    :func:`run_local` points ``sys.stdout`` (and ``sys.stderr``) here while the pipeline runs.
    The last lines of each step are kept to name the reason when a step fails.
    """

    def __init__(self, sink: TextIO, events: StepEvents | None = None, keep: int = 200):
        """Write every line to ``sink``; tell ``events`` about steps and their lines."""
        self.sink = sink
        self.events = events
        self.step: str | None = None
        self.failed: str | None = None
        self.tail: dict[str, deque[str]] = {}
        self._keep = keep
        self._started = 0.0
        self._partial = ""
        self._colour = sink.isatty()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.sink.write(s if self._colour else _ANSI.sub("", s))
        self._partial += s
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(_ANSI.sub("", line))
        return len(s)

    def flush(self) -> None:
        self.sink.flush()

    def _line(self, line: str) -> None:
        if started := _TASK_STARTED.search(line):
            self.step = _step_name(started.group(1))
            self.tail[self.step] = deque(maxlen=self._keep)
            self._started = time.monotonic()
            if self.events:
                self.events.step_started(self.step)
        elif finished := _TASK_FINISHED.search(line):
            step, ok = _step_name(finished.group(1)), finished.group(2) == "SUCCESS"
            if not ok:
                self.failed = step
            if self.events:
                self.events.step_finished(step, time.monotonic() - self._started, ok)
            self.step = None
        elif self.step is not None:
            self.tail[self.step].append(line.strip())
            if self.events:
                self.events.step_line(self.step, line.strip())

    def failure_reason(self, step: str) -> str:
        """The error line a failed step printed last (its exception), else its last line."""
        lines = [x for x in self.tail.get(step, ()) if x]
        for line in reversed(lines):
            if _ERROR_LINE.match(line):
                return line
        return lines[-1] if lines else "no output"


def compile_pipeline(pipeline: Pipeline, out: Path) -> Path:
    """Write ``pipeline``'s IR YAML to ``out``."""
    from kfp import compiler

    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(out))
    return out


def run_local(
    pipeline: Pipeline,
    arguments: dict[str, Any],
    pipeline_root: Path,
    sink: TextIO | None = None,
    events: StepEvents | None = None,
    log_name: str | None = None,
) -> Path:
    """Run the pipeline end to end through ``kfp.local``; returns the local pipeline root.

    Object-store settings come from this process's environment (``S3_ENDPOINT``, …), which
    every step inherits.

    Args:
        pipeline: The pipeline function.
        arguments: Pipeline parameters.
        pipeline_root: ``kfp.local``'s pipeline root (step outputs).
        sink: Where ``kfp.local``'s output goes (default: this process's stdout).
        events: Told when each step starts and ends, and of each line it prints.
        log_name: Where the full output can be read, named in the error when a step fails.

    Raises:
        MedsegError: When a step fails, naming the step and the error it printed last.
    """
    import kfp.local

    pipeline_root.mkdir(parents=True, exist_ok=True)
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
    )
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    stream = KfpLocalLog(sink if sink is not None else sys.stdout, events)
    try:
        with (
            contextlib.redirect_stdout(stream),
            contextlib.redirect_stderr(stream),
            warnings.catch_warnings(),
        ):
            # The steps' base_image is the project image, which kfp.local does not use.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            pipeline(**arguments)
    except RuntimeError as exc:  # kfp.local's "Task … finished with status FAILURE"
        step = stream.failed
        if step is None:
            raise
        where = f" (full log: {log_name})" if log_name else ""
        raise MedsegError(
            f"pipeline step {step} failed: {stream.failure_reason(step)}{where}"
        ) from exc
    finally:
        stream.flush()
    return pipeline_root


def submit(
    pipeline: Pipeline,
    host: str,
    arguments: dict[str, Any],
    experiment: str,
    package: Path,
    release: Release = DEFAULT_RELEASE,
    service_account: str | None = None,
) -> str:
    """Start a run on a KFP backend (the compiled package is sent with the run); its id.

    The run's pods run in the release's namespace as its pipeline ServiceAccount (or
    ``service_account``, the chart's ``pipeline.serviceAccount``), where the chart's Role grants
    the pipeline's permissions (creating PyTorchJobs and InferenceServices); ``release`` is the
    one the ``cluster`` argument names (see
    :func:`medseg.platform.pipeline_params.pipeline_arguments`).

    Raises:
        MedsegError: If the backend cannot be reached or refuses the run.
    """
    import kfp

    compile_pipeline(pipeline, package)
    with _backend_errors(host):
        client = kfp.Client(host=host)
        run = client.create_run_from_pipeline_package(
            str(package),
            arguments=arguments,
            experiment_name=experiment,
            namespace=release.namespace,
            service_account=service_account or release.pipeline_service_account,
        )
    return str(run.run_id)


@contextlib.contextmanager
def _backend_errors(host: str) -> Iterator[None]:
    """A KFP backend's failures (unreachable, an API error) as one clear :class:`MedsegError`."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    try:
        with warnings.catch_warnings():
            # kfp.Client's constructor warns on every call that it needs a v2 backend.
            warnings.filterwarnings("ignore", message="This client only works with Kubeflow")
            yield
    except ApiException as exc:
        raise MedsegError(f"KFP backend {host} answered {exc.status}: {exc.reason}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise MedsegError(f"KFP backend {host} unreachable: {type(exc).__name__}") from None


def upload(pipeline: Pipeline, host: str, name: str, version: str, package: Path) -> str:
    """Upload the compiled pipeline to a KFP backend as ``name`` (a new version if it exists)."""
    import kfp

    compile_pipeline(pipeline, package)
    with _backend_errors(host):
        client = kfp.Client(host=host)
        existing = client.get_pipeline_id(name)
        if existing is None:
            return str(client.upload_pipeline(str(package), pipeline_name=name).pipeline_id)
        result = client.upload_pipeline_version(
            str(package), pipeline_version_name=version, pipeline_id=existing
        )
        return str(result.pipeline_version_id)
