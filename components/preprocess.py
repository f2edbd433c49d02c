"""Preprocess: ``medseg.preprocess`` — the static chain once per case, cached in the store."""

from kfp.dsl import Dataset, Input, Output

from components.base import component


@component
def preprocess_op(dataset: Input[Dataset], config_yaml: str, preprocessed: Output[Dataset]) -> None:
    """Preprocess the dataset version with the config's data section (its fingerprint)."""
    from medseg.pipeline_params import (
        DatasetArtifact,
        PreprocessedArtifact,
        parse_config,
        read_ref,
        write_ref,
    )
    from medseg.preprocess import preprocess

    source = read_ref(dataset, DatasetArtifact)
    cfg = parse_config(config_yaml)
    result = preprocess(source.dataset, source.store, cfg.data, progress=False)
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
