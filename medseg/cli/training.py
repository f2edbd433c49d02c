"""Model commands: ``train``, ``evaluate``, ``register``, ``models list``, ``lineage``.

Training, prediction and evaluation load torch and MONAI: their commands import them when they
run, so that ``medseg --help`` and the light commands start without them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from medseg.artifact.files import read_config, trained_on
from medseg.artifact.lineage import lineage
from medseg.cli.common import ConfigOpt, StoreOpt, app, console, handles_errors, load_config
from medseg.core.settings import DEFAULT_STORE
from medseg.core.storage import Storage
from medseg.platform.launchers import TorchrunLauncher, TrainRun
from medseg.registry.register import list_models, model_uri, register
from medseg.tasks import task_of

models_app = typer.Typer(help="Inspect the model registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")

ModelRef = Annotated[
    str, typer.Option(help="Run id, NAME@VERSION from the registry, or a model URI.")
]
NprocOpt = Annotated[
    int, typer.Option(min=1, help="Processes; above 1, torchrun starts them (gloo on CPU).")
]
RestartsOpt = Annotated[int, typer.Option(min=0, help="torchrun restarts after a failure.")]
EvalDataset = Annotated[
    str | None, typer.Option(help="NAME@VERSION; default: the model's training dataset.")
]
GateOpt = Annotated[float | None, typer.Option(help="Quality gate on the mean Dice over TC/WT/ET.")]
EnforceOpt = Annotated[bool, typer.Option(help="Exit with status 3 when the gate fails.")]
PredictionsOpt = Annotated[
    str | None,
    typer.Option(help="Output of `medseg predict` for the split; default: predict it now."),
]


@app.command("train")
@handles_errors
def train_cmd(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="NAME[@VERSION], preprocessed.")],
    run_id: Annotated[str, typer.Option(help="Run id; the same id resumes the run.")],
    store: StoreOpt = DEFAULT_STORE,
    config: ConfigOpt = None,
    nproc_per_node: NprocOpt = 1,
    max_restarts: RestartsOpt = 3,
) -> None:
    """Train SegResNet on a preprocessed dataset (resumes the run if it has checkpoints)."""
    run = TrainRun(dataset, store, run_id, str(config) if config else None)
    if nproc_per_node > 1:
        TorchrunLauncher(nproc_per_node, max_restarts).launch(run)
        return
    from medseg.training.train import train

    result = train(dataset, store, run_id, load_config(config))
    best = result.best
    console.print(
        f"run {run_id}: {len(result.history)} epochs (resumed after {result.resumed_from}), "
        f"best mean Dice {best.get('dice_mean', float('nan')):.3f} at epoch {best.get('epoch')}; "
        f"model in {result.run_prefix}/model/"
    )


@app.command("evaluate")
@handles_errors
def evaluate_cmd(
    model: ModelRef,
    store: StoreOpt = DEFAULT_STORE,
    dataset: EvalDataset = None,
    split: Annotated[str, typer.Option(help="validation, train or all.")] = "validation",
    threshold: GateOpt = None,
    enforce: EnforceOpt = False,
    out: Annotated[str | None, typer.Option(help="Output prefix; default: RUN/eval.")] = None,
    predictions: PredictionsOpt = None,
) -> None:
    """Score the served answers of a split (Dice, HD95 in mm; or AUC), report, optional gate.

    Without ``--predictions``, the split is predicted first (as ``medseg predict`` does).
    """
    from medseg.evaluation.evaluate import evaluate

    storage = Storage()
    uri = model_uri(storage, store, model)
    task = task_of(read_config(uri, storage))  # not a model artifact: said before predicting
    predictions = predictions or _predict_split(storage, uri, store, dataset, split)
    result = evaluate(
        uri,
        predictions,
        dataset=dataset,
        store=store if dataset else None,
        split=split,
        threshold=threshold,
        out=out,
        storage=storage,
    )
    if task.outputs.kind == "classes":
        _print_classes(result, split)
        gate = result.gate_metric
    else:
        _print_evaluation(result, split)
        gate = "mean Dice"
    if threshold is not None:
        verdict = "passed" if result.passed else "FAILED"
        console.print(f"quality gate ({gate} ≥ {threshold}): {verdict}")
        if enforce and not result.passed:
            raise typer.Exit(3)


def _predict_split(storage: Storage, uri: str, store: str, dataset: str | None, split: str) -> str:
    """Predict the split to evaluate (by default of the model's training dataset); its output."""
    from medseg.inference.predict import predict

    if dataset is None:
        trained = trained_on(uri, storage)
        dataset, store = trained.dataset, trained.store
    return predict(uri, dataset=dataset, split=split, store=store, storage=storage).out


def _print_classes(result: Any, split: str) -> None:
    """A classifier's :class:`~medseg.inference.classify.ClassEval`: AUC per class, macro, more."""
    m = result.metrics
    table = Table(title=f"{result.dataset} · {split} · {sum(map(sum, m.confusion))} images")
    for col in ("class", "AUC", "sensitivity", "specificity"):
        table.add_column(col, justify="right")
    for c, a, se, sp in zip(m.classes, m.auc, m.sensitivity, m.specificity, strict=True):
        table.add_row(c, f"{a:.4f}", f"{se:.4f}", f"{sp:.4f}")
    console.print(table)
    console.print(
        f"macro AUC {m.macro_auc:.4f} · balanced accuracy {m.balanced_accuracy:.4f} · "
        f"ECE {m.calibration.ece:.4f}",
        highlight=False,
    )
    console.print(f"report: {result.out}/report.html")


def _print_evaluation(result: Any, split: str) -> None:
    """An :class:`~medseg.evaluation.evaluate.EvalResult`'s scores, as a table and its sources."""
    table = Table(title=f"{result.dataset} · {split} · {len(result.cases)} cases")
    for col in ("region", "Dice", "HD95 (mm)"):
        table.add_column(col, justify="right")
    for region in result.dice:
        table.add_row(region, f"{result.dice[region]:.4f}", f"{result.hd95[region]:.2f}")
    table.add_row("mean", f"{result.dice_mean:.4f}", "")
    console.print(table)
    console.print(f"metric: {result.definition}", highlight=False)
    if result.missing:
        console.print(f"no prediction (scored as empty): {', '.join(result.missing)}")
    console.print(f"report: {result.out}/report.html")


@app.command("register")
@handles_errors
def register_cmd(
    run_id: Annotated[str, typer.Option(help="Finished training run.")],
    name: Annotated[str, typer.Option(help="Model name in the registry.")],
    store: StoreOpt = DEFAULT_STORE,
    export: Annotated[
        bool,
        typer.Option(
            "--export/--no-export",
            help="Also store model.onnx for the CPU engines (infer.engine: auto picks OpenVINO).",
        ),
    ] = True,
) -> None:
    """Register a run's model as the next version of NAME, with its model card."""
    card = register(Storage(), store, run_id, name, export=export)
    graph = " (with model.onnx)" if export else ""
    console.print(f"registered {card['name']}@{card['version']} from run {run_id}{graph}")


@models_app.command("list")
@handles_errors
def models_list(store: StoreOpt = DEFAULT_STORE) -> None:
    """List registered model versions."""
    table = Table()
    for col in ("model", "version", "run", "dataset", "mean Dice", "created"):
        table.add_column(col)
    for c in list_models(Storage(), store):
        dice = c["metrics"].get("dice_mean")
        table.add_row(
            c["name"],
            c["version"],
            c["run_id"],
            f"{c['dataset']['name']}@{c['dataset']['version']}",
            "" if dice is None else f"{dice:.3f}",
            c["created_at"][:19],
        )
    console.print(table)


@app.command("lineage")
@handles_errors
def lineage_cmd(
    ref: Annotated[
        str,
        typer.Argument(
            help="Dataset NAME@VERSION, run id, registered NAME@vN, InferenceService name, "
            "or a predictions.json URI."
        ),
    ],
    store: StoreOpt = DEFAULT_STORE,
    namespace: Annotated[
        str | None, typer.Option(help="InferenceServices' namespace; default: all.")
    ] = None,
    cluster: Annotated[
        bool, typer.Option("--cluster/--no-cluster", help="Read deployments from the cluster.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the links as JSON.")] = False,
) -> None:
    """The chain both ways: raw data, dataset, run, model version, deployments, predictions."""
    found = lineage(Storage(), store, ref, namespace=namespace, cluster=cluster)
    if as_json:
        print(json.dumps(found.to_json(), indent=2, default=str))
    else:
        console.print("\n".join(found.lines()), highlight=False, markup=False)
