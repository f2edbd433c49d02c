"""What every command shares: the typer app, the consoles, the error handling, the options."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Annotated, NoReturn, ParamSpec, Protocol, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from medseg.config import MedsegConfig
from medseg.core.errors import MedsegError

__all__ = [
    "CollectOpt",
    "ConfigOpt",
    "ShardOpt",
    "ShardsOpt",
    "StoreOpt",
    "ThresholdOpt",
    "app",
    "console",
    "err_console",
    "fail",
    "failures_table",
    "handles_errors",
    "load_config",
    "print_shard",
    "shard_mode",
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
    str | None,
    typer.Option(
        "--config", "-c", help="medseg config YAML, a path or s3:// URI (defaults otherwise)."
    ),
]
ThresholdOpt = Annotated[
    float, typer.Option(help="Quality gate on the task's metric (BraTS: validation mean Dice).")
]

ShardsOpt = Annotated[
    int,
    typer.Option(
        min=1, help="Split the cases into this many shards (by case id); see --shard, --collect."
    ),
]
ShardOpt = Annotated[
    int | None,
    typer.Option(min=0, help="Run only this shard, 0 to shards-1 (one per machine or pod)."),
]
CollectOpt = Annotated[
    bool, typer.Option("--collect", help="After every shard has run: write the one index.")
]


def shard_mode(shards: int, shard: int | None, collect: bool) -> str:
    """``whole``, ``shard`` or ``collect``: what ``--shards/--shard/--collect`` ask for.

    Raises:
        MedsegError: If both or neither of ``--shard`` and ``--collect`` go with ``--shards`` > 1,
            or the shard is not one of ``0 … shards-1``.
    """
    if shard is not None and collect:
        raise MedsegError("give --shard I to run one shard or --collect afterwards, not both")
    if shard is not None and shard >= shards:
        raise MedsegError(f"--shard {shard} is not one of 0…{shards - 1} (--shards {shards})")
    if shard is not None:
        return "shard"
    if collect:
        return "collect"
    if shards > 1:
        raise MedsegError(
            f"--shards {shards}: run each shard with --shard 0 … --shard {shards - 1} "
            "(each on its own machine or pod, in any order), then once with --collect"
        )
    return "whole"


class ShardDone(Protocol):
    """What a shard did (:class:`medseg.platform.shards.ShardResult`)."""

    shard: int
    shards: int
    cases: list[str]
    computed: list[str]
    reused: list[str]


def print_shard(result: ShardDone, collect: str) -> None:
    """One shard's counts, and the command that collects the shards."""
    console.print(
        f"shard {result.shard} of {result.shards}: {len(result.cases)} cases, "
        f"{len(result.computed)} computed, {len(result.reused)} already done"
    )
    console.print(f"when every shard is done: {collect} --shards {result.shards} --collect")


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


def load_config(location: str | None) -> MedsegConfig:
    """The config at ``location`` (a path or ``s3://`` URI), else the defaults."""
    return MedsegConfig.read(location) if location else MedsegConfig()


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
