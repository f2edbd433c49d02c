"""The ``medseg`` command line: thin commands, one module per command group.

Each command parses its options, calls one library function and prints the result; expected
failures (:class:`~medseg.core.errors.MedsegError`) print one clear line and exit 1, without a
traceback (:func:`~medseg.cli.common.handles_errors`).

Modules: :mod:`~medseg.cli.data` (synth, ingest, preprocess, datasets), :mod:`~medseg.cli.training`
(train, evaluate, register, models, lineage), :mod:`~medseg.cli.serving` (serve, deploy, predict),
:mod:`~medseg.cli.pipeline` (pipeline …), :mod:`~medseg.cli.local` (minio, mlflow, demo).
"""

from medseg.cli import data, local, pipeline, serving, training
from medseg.cli.common import app, console, err_console

__all__ = ["app", "console", "err_console", "main"]

# The command modules register themselves on ``app`` when imported (in help order).
_COMMANDS = (data, training, serving, pipeline, local)


def main() -> None:
    """Console-script entry point."""
    app()
