"""Shards: the data-parallel halves of preprocess and predict (``medseg.platform.shards``).

``shards_op`` turns the pipeline's ``shards`` parameter into the list a ``ParallelFor`` runs
over; each shard step does the cases of its shard that are not done yet; the collect steps
(``preprocess_op``, ``predict_op``) then write the one commit; ``clean_shard_op`` removes a
shard's records once both commits are there.
"""

from kfp.dsl import Dataset, Input, Model

from components.base import component


@component
def shards_op(shards: int) -> list[int]:
    """The shard indices ``0 … shards-1``; fails on a count below 1."""
    from medseg.core.errors import MedsegError
    from medseg.platform.shards import shard_list

    try:
        return shard_list(shards)
    except MedsegError as exc:
        raise MedsegError(f"bad pipeline parameter shards: {exc}") from None


@component
def preprocess_shard_op(dataset: Input[Dataset], config_yaml: str, shard: int, shards: int) -> int:
    """Preprocess this shard's cases of the dataset version; returns how many it computed."""
    from medseg.platform.pipeline_params import DatasetArtifact, parse_config, read_ref
    from medseg.platform.shards import preprocess_shard

    source = read_ref(dataset, DatasetArtifact)
    cfg = parse_config(config_yaml)
    result = preprocess_shard(source.dataset, source.store, cfg.data, shard, shards)
    print(f"shard {shard} of {shards}: {len(result.computed)} computed, {len(result.reused)} done")
    return len(result.computed)


@component
def predict_shard_op(
    model: Input[Model], dataset: Input[Dataset], split: str, shard: int, shards: int
) -> int:
    """Predict this shard's cases of the split as the server does; returns how many it wrote.

    A case that fails is recorded (the collect step lists it and fails the run).
    """
    from medseg.platform.pipeline_params import DatasetArtifact, ModelArtifact, read_ref
    from medseg.platform.shards import predict_shard

    source = read_ref(dataset, DatasetArtifact)
    weights = read_ref(model, ModelArtifact)
    result = predict_shard(weights.uri, source.dataset, split, source.store, shard, shards)
    print(
        f"shard {shard} of {shards}: {len(result.computed)} computed, {len(result.reused)} done, "
        f"{len(result.failed)} failed"
    )
    return len(result.computed)


@component
def clean_shard_op(
    dataset: Input[Dataset],
    preprocessed: Input[Dataset],
    predictions: Input[Dataset],
    shard: int,
    shards: int,
) -> int:
    """Delete this shard's records once the preprocess and predict commits are written."""
    from medseg.core.storage import Storage
    from medseg.platform.pipeline_params import (
        DatasetArtifact,
        PredictionsArtifact,
        PreprocessedArtifact,
        read_ref,
    )
    from medseg.platform.shards import clean_shard

    source = read_ref(dataset, DatasetArtifact)
    pred = read_ref(predictions, PredictionsArtifact)
    return clean_shard(
        Storage(),
        source.dataset,
        source.store,
        shard,
        shards,
        preprocessed=read_ref(preprocessed, PreprocessedArtifact).uri,
        predictions=pred.uri,
        split=pred.split,
    )
