"""Ingest: validate pipeline parameters, then ``medseg.ingest`` a raw dataset into the store."""

from kfp.dsl import Dataset, Output

from components.base import component


@component
def ingest_op(
    source: str,
    name: str,
    store: str,
    labels: str,
    config_yaml: str,
    launcher: str,
    workers: int,
    gpus_per_worker: int,
    dataset: Output[Dataset],
) -> str:
    """Check the run's parameters (first step: fail fast), ingest ``source``; ``NAME@VERSION``."""
    import json

    import yaml

    from medseg.config import MedsegConfig
    from medseg.ingest import ingest
    from medseg.launchers import TrainTarget

    TrainTarget(launcher, workers, gpus_per_worker)  # fails here, before any work
    cfg = MedsegConfig.model_validate(yaml.safe_load(config_yaml) or {})
    result = ingest(source, name, store, labels=labels or None, split=cfg.split)
    m = result.manifest
    spec = str(result.ref)
    dataset.metadata.update(
        {
            "uri": f"{store.rstrip('/')}/datasets/{name}/{m.version}",
            "version": m.version,
            "cases": len(m.cases),
            "quarantined": len(m.quarantined),
            "label_convention": m.convention,
        }
    )
    with open(dataset.path, "w") as f:
        json.dump({"dataset": spec, "cases": [c.case_id for c in m.cases]}, f)
    return spec
