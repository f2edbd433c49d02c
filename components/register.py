"""Register: ``medseg.registry.register`` — the next version of the model, with its model card."""

from kfp.dsl import Artifact, Input, Markdown, Model, Output

from components.base import component


@component
def register_op(
    model: Input[Model],
    evaluation: Input[Artifact],
    store: str,
    name: str,
    registered: Output[Model],
    card: Output[Markdown],
) -> None:
    """Register the run's model as the next version of ``name``, with its evaluation."""
    from medseg.artifact.files import WEIGHTS_FILE
    from medseg.core.storage import Storage, join
    from medseg.platform.pipeline_params import (
        EvaluationArtifact,
        ModelArtifact,
        read_ref,
        write_ref,
    )
    from medseg.registry.register import model_card_markdown, register

    run = read_ref(model, ModelArtifact)
    scored = read_ref(evaluation, EvaluationArtifact)
    storage = Storage()
    metrics = join(scored.uri, "metrics.json")
    model_card = register(storage, store, run.run_id, name, evaluation=metrics, export=True)
    version = model_card["version"]
    uri = join(store, "models", name, version)
    with open(card.path, "w") as f:
        f.write(model_card_markdown(name, uri, model_card))
    card.metadata["uri"] = uri
    ref = ModelArtifact(
        uri=uri,
        digest=model_card["files"][WEIGHTS_FILE],
        run_id=run.run_id,
        dataset=run.dataset,
        version=version,
    )
    write_ref(registered, ref)
