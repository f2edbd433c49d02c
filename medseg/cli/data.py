"""Data commands: ``synth``, ``ingest``, ``preprocess``, ``datasets list``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medseg.cli.common import (
    CollectOpt,
    ConfigOpt,
    ShardOpt,
    ShardsOpt,
    StoreOpt,
    app,
    console,
    fail,
    failures_table,
    handles_errors,
    load_config,
    print_shard,
    shard_mode,
)
from medseg.core.settings import DEFAULT_STORE
from medseg.core.storage import Storage
from medseg.data.manifest import list_manifests

datasets_app = typer.Typer(help="Inspect stored datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")

Shape = Annotated[
    tuple[int, int, int], typer.Option(help="Volume shape; 240 240 155 is full BraTS size.")
]
Format = Annotated[
    str,
    typer.Option("--format", help="nifti, or dicom (MR studies; labels in --layout's convention)."),
]
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="Dataset name.")]
LabelsOpt = Annotated[
    str | None, typer.Option(help="Label convention override: brats2021, brats2023, msd.")
]


@app.command()
@handles_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the cases into.")],
    layout: Annotated[
        str | None,
        typer.Option(help="brats2021 (default), brats2023 or msd; ham10000 for skin-lesion."),
    ] = None,
    cases: Annotated[
        int | None,
        typer.Option(min=1, help="Number of cases (default 8), or of images (default 210)."),
    ] = None,
    shape: Shape = (96, 96, 64),
    seed: Annotated[int, typer.Option(help="Dataset seed.")] = 0,
    fmt: Format = "nifti",
    task: Annotated[
        str,
        typer.Option(
            help="brats (3D MRI cases) or skin-lesion (dermoscopy-like JPEGs, HAM10000 layout)."
        ),
    ] = "brats",
) -> None:
    """Write deterministic synthetic BraTS-like cases in a public layout, or as DICOM studies."""
    if task == "skin-lesion":
        from medseg.data.skin_synth import write_ham10000

        if layout not in (None, "ham10000"):
            fail(f"--task skin-lesion writes the ham10000 layout, not {layout!r}")
        images = write_ham10000(out, 210 if cases is None else cases, seed)
        lesions = len({i.lesion_id for i in images})
        console.print(f"wrote {len(images)} HAM10000-like images of {lesions} lesions to {out}")
        return
    if task != "brats":
        fail(f"unknown task {task!r}: use brats or skin-lesion")
    from medseg.data.synth import synthesize

    layout = layout or "brats2021"
    ids = synthesize(out, layout, 8 if cases is None else cases, shape, seed, fmt)
    if fmt == "dicom":
        console.print(f"wrote {len(ids)} DICOM studies ({layout} labels) of shape {shape} to {out}")
    else:
        console.print(f"wrote {len(ids)} {layout} cases of shape {shape} to {out}")


@app.command()
@handles_errors
def ingest(
    source: Annotated[
        str,
        typer.Argument(
            help="Dataset folder or s3:// prefix (a public layout, or DICOM studies: these are "
            "de-identified with MEDSEG_DEID_KEY)."
        ),
    ],
    dataset: DatasetOpt,
    store: StoreOpt = DEFAULT_STORE,
    labels: LabelsOpt = None,
    strict: Annotated[bool, typer.Option(help="Fail if any case is invalid.")] = False,
    workers: Annotated[int, typer.Option(min=1, help="Validation processes.")] = 1,
    config: ConfigOpt = None,
) -> None:
    """Validate raw cases, quarantine bad ones, and store a versioned dataset."""
    from medseg.data.ingest import ingest as run_ingest

    split = load_config(config).split
    result = run_ingest(
        source, dataset, store, labels=labels, split=split, strict=strict, workers=workers
    )
    m = result.manifest
    verb = "stored" if result.created else "already stored (no-op)"
    console.print(
        f"dataset [bold]{result.ref}[/] {verb}: layout {m.layout}, labels {m.convention}, "
        f"{len(m.cases)} valid cases ({len(m.split_ids('train'))} train, "
        f"{len(m.split_ids('validation'))} validation), {result.uploaded} files uploaded"
    )
    if m.quarantined:
        console.print(failures_table(f"{len(m.quarantined)} quarantined cases", m.quarantined))
    console.print(f"manifest: {result.ref.manifest_uri}")


@app.command()
@handles_errors
def preprocess(
    dataset: Annotated[
        str, typer.Option("--dataset", "-d", help="NAME, NAME@latest or NAME@VERSION.")
    ],
    store: StoreOpt = DEFAULT_STORE,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = max(
        1, min(4, os.cpu_count() or 1)
    ),
    config: ConfigOpt = None,
    shards: ShardsOpt = 1,
    shard: ShardOpt = None,
    collect: CollectOpt = False,
) -> None:
    """Run the static preprocessing once per case and cache the result in the store.

    With --shards K, each of K machines runs --shard I (its cases, by case id; a rerun does only
    the cases not done), then one run with --collect writes the index the unsharded step writes.
    """
    from medseg.data.preprocess import preprocess as run_preprocess
    from medseg.platform.shards import collect_preprocessed, preprocess_shard

    cfg = load_config(config).data
    mode = shard_mode(shards, shard, collect)
    if mode == "shard":
        assert shard is not None
        done = preprocess_shard(dataset, store, cfg, shard, shards, workers=workers, progress=True)
        print_shard(done, f"medseg preprocess -d {dataset}")
        return
    if mode == "collect":
        result = collect_preprocessed(dataset, store, cfg, shards)
    else:
        result = run_preprocess(dataset, store, cfg, workers=workers)
    n = len(result.index["cases"])
    if result.processed:
        verb = "collected" if mode == "collect" else "preprocessed"
        console.print(f"{verb} {result.processed} of {n} cases into {result.prefix}")
    else:
        console.print(f"all {n} cases already preprocessed (no-op): {result.prefix}")


@datasets_app.command("list")
@handles_errors
def datasets_list(store: StoreOpt = DEFAULT_STORE) -> None:
    """List stored dataset versions."""
    table = Table()
    for col in ("dataset", "version", "layout", "cases", "quarantined", "created"):
        table.add_column(col)
    for m in list_manifests(Storage(), store):
        table.add_row(
            m.name,
            m.version,
            m.layout,
            str(len(m.cases)),
            str(len(m.quarantined)),
            m.created_at[:19],
        )
    console.print(table)
