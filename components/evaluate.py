"""Evaluate: ``medseg.evaluate`` — the served label maps scored, the HTML report, the gate."""

from typing import NamedTuple

from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from components.base import component


@component
def evaluate_op(
    model_uri: str,
    predictions: Input[Dataset],
    threshold: float,
    report: Output[HTML],
    metrics: Output[Metrics],
) -> NamedTuple("EvalOutputs", passed=bool, dice_mean=float, eval_uri=str):  # type: ignore[valid-type]
    """Score the predicted label maps of the validation split; the report shows in the KFP UI."""
    from collections import namedtuple

    from medseg.evaluate import evaluate
    from medseg.storage import Storage, join

    storage = Storage()
    result = evaluate(
        model_uri,
        split=predictions.metadata["split"],
        dataset=predictions.metadata["dataset"],
        store=predictions.metadata["store"],
        threshold=threshold,
        storage=storage,
        predictions=predictions.metadata["uri"],
    )
    for region, value in result.dice.items():
        metrics.log_metric(f"dice_{region.lower()}", round(value, 4))
        metrics.log_metric(f"hd95_{region.lower()}", round(result.hd95[region], 2))
    metrics.log_metric("dice_mean", round(result.dice_mean, 4))
    metrics.log_metric("gate_passed", int(result.passed))
    with open(report.path, "wb") as f:
        f.write(storage.get_bytes(join(result.out, "report.html")))
    report.metadata.update({"uri": join(result.out, "report.html"), "metric": result.definition})
    EvalOutputs = namedtuple("EvalOutputs", ["passed", "dice_mean", "eval_uri"])
    return EvalOutputs(result.passed, result.dice_mean, result.out)
