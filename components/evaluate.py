"""Evaluate: ``medseg.evaluate`` — Dice/HD95 per region, the HTML report, the quality gate."""

from typing import NamedTuple

from kfp.dsl import HTML, Metrics, Output

from components.base import component


@component
def evaluate_op(
    model_uri: str, threshold: float, report: Output[HTML], metrics: Output[Metrics]
) -> NamedTuple("EvalOutputs", passed=bool, dice_mean=float, eval_uri=str):  # type: ignore[valid-type]
    """Score the model on its validation split; the report shows in the KFP UI."""
    from collections import namedtuple

    from medseg.evaluate import evaluate
    from medseg.storage import Storage, join

    storage = Storage()
    result = evaluate(model_uri, threshold=threshold, storage=storage)
    for region, value in result.dice.items():
        metrics.log_metric(f"dice_{region.lower()}", round(value, 4))
        metrics.log_metric(f"hd95_{region.lower()}", round(result.hd95[region], 2))
    metrics.log_metric("dice_mean", round(result.dice_mean, 4))
    metrics.log_metric("gate_passed", int(result.passed))
    with open(report.path, "wb") as f:
        f.write(storage.get_bytes(join(result.out, "report.html")))
    report.metadata["uri"] = join(result.out, "report.html")
    EvalOutputs = namedtuple("EvalOutputs", ["passed", "dice_mean", "eval_uri"])
    return EvalOutputs(result.passed, result.dice_mean, result.out)
