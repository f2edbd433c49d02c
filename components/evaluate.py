"""Evaluate: ``medseg.evaluate`` — the served label maps scored, the HTML report, the gate."""

from typing import NamedTuple

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.base import component


@component
def evaluate_op(
    model: Input[Model],
    predictions: Input[Dataset],
    threshold: float,
    report: Output[HTML],
    metrics: Output[Metrics],
    evaluation: Output[Artifact],
) -> NamedTuple("EvalOutputs", passed=bool, dice_mean=float):  # type: ignore[valid-type]
    """Score the predicted label maps of the validation split; the report shows in the KFP UI."""
    from collections import namedtuple

    from medseg.evaluate import evaluate
    from medseg.pipeline_params import (
        EvaluationArtifact,
        ModelArtifact,
        PredictionsArtifact,
        object_digest,
        read_ref,
        write_ref,
    )
    from medseg.storage import Storage, join

    weights = read_ref(model, ModelArtifact)
    scored = read_ref(predictions, PredictionsArtifact)
    storage = Storage()
    result = evaluate(
        weights.uri,
        split=scored.split,
        dataset=scored.dataset,
        store=scored.store,
        threshold=threshold,
        storage=storage,
        predictions=scored.uri,
    )
    for region, value in result.dice.items():
        metrics.log_metric(f"dice_{region.lower()}", round(value, 4))
        metrics.log_metric(f"hd95_{region.lower()}", round(result.hd95[region], 2))
    metrics.log_metric(result.gate_metric, round(result.dice_mean, 4))  # the task's gate
    metrics.log_metric("gate_passed", int(result.passed))
    with open(report.path, "wb") as f:
        f.write(storage.get_bytes(join(result.out, "report.html")))
    report.metadata.update({"uri": join(result.out, "report.html"), "metric": result.definition})
    ref = EvaluationArtifact(
        uri=result.out,
        digest=object_digest(storage, join(result.out, "metrics.json")),
        passed=result.passed,
        dice_mean=result.dice_mean,
    )
    write_ref(evaluation, ref)
    EvalOutputs = namedtuple("EvalOutputs", ["passed", "dice_mean"])
    return EvalOutputs(result.passed, result.dice_mean)
