"""Preprocess: collect the shards' work (``medseg.platform.shards``) in one cached index.json."""

from kfp.dsl import Dataset, Input, Output

from components.base import component


@component
def preprocess_op(
    dataset: Input[Dataset], config_yaml: str, shards: int, preprocessed: Output[Dataset]
) -> None:
    """Write the preprocessing's index from its shards (``preprocess_shard_op``, all done).

    Fails, naming the shard and its cases, when a case is missing; writes nothing then.
    """
    from medseg.platform.pipeline_params import (
        DatasetArtifact,
        PreprocessedArtifact,
        parse_config,
        read_ref,
        write_ref,
    )
    from medseg.platform.shards import collect_preprocessed

    source = read_ref(dataset, DatasetArtifact)
    cfg = parse_config(config_yaml)
    result = collect_preprocessed(source.dataset, source.store, cfg.data, shards)
    write_ref(
        preprocessed,
        PreprocessedArtifact(
            uri=result.prefix,
            digest=cfg.data.fingerprint(),
            dataset=source.dataset,
            cases=len(result.index["cases"]),
        ),
    )
    preprocessed.metadata["processed_now"] = result.processed
