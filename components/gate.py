"""Gate: stop the run before register/deploy when the model is below the quality bar."""

from components.base import component


@component
def gate_op(passed: bool, dice_mean: float, threshold: float) -> float:
    """Fail (the run stops here, nothing registered) unless the evaluation passed."""
    if not passed:
        raise RuntimeError(
            f"quality gate failed: validation mean Dice {dice_mean:.4f} < {threshold}; "
            "the model is not registered or deployed"
        )
    print(f"[medseg] quality gate passed: mean Dice {dice_mean:.4f} >= {threshold}")
    return dice_mean
