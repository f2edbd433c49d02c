"""Predict: ``medseg.predict`` — the served label maps of a dataset split, with one loaded model."""

from kfp.dsl import Dataset, Output

from components.base import component


@component
def predict_op(
    model_uri: str, dataset_spec: str, store: str, split: str, predictions: Output[Dataset]
) -> str:
    """Segment the split's raw cases as the server does; returns the predictions' URI.

    Fails (after writing every other case) when a case could not be predicted.
    """
    from medseg.predict import predict

    result = predict(model_uri, dataset=dataset_spec, split=split, store=store)
    predictions.metadata.update(
        {
            "uri": result.out,
            "store": store,
            "dataset": dataset_spec,
            "split": split,
            "cases": len(result.cases),
            "failed": len(result.failed),
        }
    )
    with open(predictions.path, "w") as f:
        f.write(result.out)
    if result.failed:
        reasons = "; ".join(f"{f.case_id}: {f.reason}" for f in result.failed)
        raise RuntimeError(f"{len(result.failed)} cases not predicted ({reasons})")
    return result.out
