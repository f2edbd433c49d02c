"""Predict: ``medseg.predict`` — the served label maps of a dataset split, with one loaded model."""

from kfp.dsl import Dataset, Input, Model, Output

from components.base import component


@component
def predict_op(
    model: Input[Model], dataset: Input[Dataset], split: str, predictions: Output[Dataset]
) -> None:
    """Segment the split's raw cases as the server does.

    Fails (after writing every other case) when a case could not be predicted.
    """
    from medseg.errors import MedsegError
    from medseg.pipeline_params import (
        DatasetArtifact,
        ModelArtifact,
        PredictionsArtifact,
        object_digest,
        read_ref,
        write_ref,
    )
    from medseg.predict import INDEX, predict
    from medseg.storage import Storage, join

    source = read_ref(dataset, DatasetArtifact)
    weights = read_ref(model, ModelArtifact)
    storage = Storage()
    result = predict(
        weights.uri, dataset=source.dataset, split=split, store=source.store, storage=storage
    )
    if result.failed:
        reasons = "; ".join(f"{f.case_id}: {f.reason}" for f in result.failed)
        raise MedsegError(f"{len(result.failed)} cases not predicted ({reasons})")
    ref = PredictionsArtifact(
        uri=result.out,
        digest=object_digest(storage, join(result.out, INDEX)),
        store=source.store,
        dataset=source.dataset,
        split=split,
        cases=len(result.cases),
    )
    write_ref(predictions, ref)
