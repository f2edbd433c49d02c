"""Ingest: ``medseg.data.ingest`` a raw dataset into the store, as a content-addressed version."""

from kfp.dsl import Dataset, Output

from components.base import component


@component
def ingest_op(
    source: str, name: str, store: str, labels: str, config_yaml: str, dataset: Output[Dataset]
) -> None:
    """Ingest ``source`` as dataset ``name``; the artifact names the version and its hash."""
    from medseg.data.ingest import ingest
    from medseg.platform.pipeline_params import DatasetArtifact, parse_config, write_ref

    cfg = parse_config(config_yaml)
    result = ingest(source, name, store, labels=labels or None, split=cfg.split)
    m = result.manifest
    write_ref(
        dataset,
        DatasetArtifact(
            uri=result.ref.prefix,
            digest=m.content_hash(),
            store=store,
            dataset=str(result.ref),
            cases=len(m.cases),
        ),
    )
    dataset.metadata.update({"quarantined": len(m.quarantined), "label_convention": m.convention})
