"""Preprocess: ``medseg.preprocess`` — the static chain once per case, cached in the store."""

from kfp.dsl import Dataset, Output

from components.base import component


@component
def preprocess_op(
    dataset_spec: str, store: str, config_yaml: str, preprocessed: Output[Dataset]
) -> str:
    """Preprocess ``dataset_spec`` with the config's data section; returns the cache prefix."""
    import yaml

    from medseg.config import MedsegConfig
    from medseg.preprocess import preprocess

    cfg = MedsegConfig.model_validate(yaml.safe_load(config_yaml) or {})
    result = preprocess(dataset_spec, store, cfg.data, progress=False)
    preprocessed.metadata.update(
        {
            "uri": result.prefix,
            "fingerprint": cfg.data.fingerprint(),
            "cases": len(result.index["cases"]),
            "processed_now": result.processed,
        }
    )
    with open(preprocessed.path, "w") as f:
        f.write(result.prefix)
    return result.prefix
