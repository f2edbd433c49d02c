"""Gate: stop the run before register/deploy when the model is below the quality bar."""

from components.base import component


@component
def gate_op(passed: bool, metric: str, value: float, threshold: float) -> float:
    """Fail (the run stops here, nothing registered) unless the evaluation passed.

    ``metric`` is the task's gate metric (BraTS: ``dice_mean``; skin lesions: ``macro_auc``)
    and ``value`` its validation value.
    """
    if not passed:
        raise RuntimeError(
            f"quality gate failed: validation {metric} {value:.4f} < {threshold}; "
            "the model is not registered or deployed"
        )
    print(f"[medseg] quality gate passed: {metric} {value:.4f} >= {threshold}")
    return value
