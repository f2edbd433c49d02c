"""Register: ``medseg.register`` — the next version of the model, with its model card."""

from kfp.dsl import Markdown, Output

from components.base import component


@component
def register_op(run_id: str, store: str, name: str, eval_uri: str, card: Output[Markdown]) -> str:
    """Register run ``run_id``'s model as ``name``; returns the version's URI."""
    from medseg.register import register
    from medseg.storage import Storage, join

    storage = Storage()
    evaluation = join(eval_uri, "metrics.json")
    model_card = register(storage, store, run_id, name, evaluation=evaluation, export=True)
    uri = join(store, "models", name, model_card["version"])
    lines = [
        f"# {name} {model_card['version']}",
        "",
        f"- model: `{uri}`",
        f"- dataset: `{model_card['dataset']['name']}@{model_card['dataset']['version']}`",
        f"- preprocessing: `{model_card['preprocessing']}`",
        f"- run: `{run_id}`, code `{model_card['code_version']}`",
    ]
    for key, value in sorted((model_card.get("evaluation") or {}).get("dice", {}).items()):
        lines.append(f"- validation Dice {key}: {value:.4f}")
    with open(card.path, "w") as f:
        f.write("\n".join(lines) + "\n")
    card.metadata["uri"] = uri
    return uri
