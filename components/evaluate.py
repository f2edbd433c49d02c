"""Evaluate: ``medseg.evaluation.evaluate`` — served answers scored by the task, report, gate."""

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
) -> NamedTuple("EvalOutputs", passed=bool, metric=str, value=float):  # type: ignore[valid-type]
    """Score the validation split's predicted answers by the model's task (report in the UI).

    ``metric`` is the task's gate metric and ``value`` its validation value.
    """
    import math
    from collections import namedtuple

    from medseg.core.storage import Storage, join
    from medseg.evaluation.evaluate import evaluate
    from medseg.platform.pipeline_params import (
        EvaluationArtifact,
        ModelArtifact,
        PredictionsArtifact,
        object_digest,
        read_ref,
        write_ref,
    )

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
    for name, value in result.summary().items():
        if math.isfinite(value):  # an AUC of a class absent from the split is undefined
            metrics.log_metric(name, round(value, 4))
    metrics.log_metric("gate_passed", int(result.passed))
    with open(report.path, "wb") as f:
        f.write(storage.get_bytes(join(result.out, "report.html")))
    report.metadata.update({"uri": join(result.out, "report.html"), "metric": result.definition})
    ref = EvaluationArtifact(
        uri=result.out,
        digest=object_digest(storage, join(result.out, "metrics.json")),
        passed=result.passed,
        metric=result.gate_metric,
        value=result.value,
    )
    write_ref(evaluation, ref)
    EvalOutputs = namedtuple("EvalOutputs", ["passed", "metric", "value"])
    return EvalOutputs(result.passed, result.gate_metric, result.value)
