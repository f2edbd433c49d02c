"""What every command shares: the typer app, the consoles, the error handling, the options."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, NoReturn, ParamSpec, Protocol, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from medseg.config import MedsegConfig
from medseg.core.errors import MedsegError

__all__ = [
    "ConfigOpt",
    "StoreOpt",
    "ThresholdOpt",
    "app",
    "console",
    "err_console",
    "fail",
    "failures_table",
    "handles_errors",
    "load_config",
]

app = typer.Typer(help="medseg: 3D medical image segmentation MLOps.", no_args_is_help=True)
console = Console(soft_wrap=True)
err_console = Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")

StoreOpt = Annotated[
    str,
    typer.Option(
        envvar="MEDSEG_STORE", help="Root of the platform's store: s3://BUCKET or a folder."
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="medseg config YAML (defaults otherwise).")
]
ThresholdOpt = Annotated[
    float, typer.Option(help="Quality gate on the task's metric (BraTS: validation mean Dice).")
]


def handles_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Expected failures of a command end in one clear line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except MedsegError as exc:
            fail(str(exc))
        except OSError as exc:  # the user's files and folders: missing, a file not a folder…
            fail(f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc))

    return wrapper


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 1."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def load_config(path: Path | None) -> MedsegConfig:
    """The config in ``path``, else the defaults."""
    return MedsegConfig.load(path) if path else MedsegConfig()


class CaseFailure(Protocol):
    """A case that was set aside: its id, the file at fault (if one) and why."""

    @property
    def case_id(self) -> str: ...

    @property
    def file(self) -> str | None: ...

    @property
    def reason(self) -> str: ...


def failures_table(title: str, failures: Iterable[CaseFailure]) -> Table:
    """The case/file/reason table of cases set aside (ingest's quarantine, predict's failures)."""
    table = Table(title=title)
    for col in ("case", "file", "reason"):
        table.add_column(col)
    for f in failures:
        table.add_row(f.case_id, f.file or "", f.reason)
    return table
