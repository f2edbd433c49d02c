"""Predict: collect the shards' label maps (``medseg.platform.shards``) in one predictions.json."""

from kfp.dsl import Dataset, Input, Model, Output

from components.base import component


@component
def predict_op(
    model: Input[Model],
    dataset: Input[Dataset],
    split: str,
    shards: int,
    predictions: Output[Dataset],
) -> None:
    """Write the split's ``predictions.json`` from its shards (``predict_shard_op``, all done).

    Fails, naming the shard and its cases, when a case is missing (writing nothing), and after
    writing the index when a case could not be predicted.
    """
    from medseg.core.errors import MedsegError
    from medseg.core.storage import Storage, join
    from medseg.inference.predict import INDEX
    from medseg.platform.pipeline_params import (
        DatasetArtifact,
        ModelArtifact,
        PredictionsArtifact,
        object_digest,
        read_ref,
        write_ref,
    )
    from medseg.platform.shards import collect_predictions

    source = read_ref(dataset, DatasetArtifact)
    weights = read_ref(model, ModelArtifact)
    storage = Storage()
    result = collect_predictions(
        weights.uri, source.dataset, split, source.store, shards, storage=storage
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
