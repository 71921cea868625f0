"""Effective robustness (Taori et al. 2020): shifted-set accuracy beyond what a baseline fit predicts from ImageNet accuracy."""

import math


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def effective_robustness(
    reference_accuracy: float, shifted_accuracies: dict[str, float], slope: float | None, intercept: float | None
) -> dict[str, float]:
    """Average accuracy over the shifted sets and, given the baseline's linear fit in logit space
    (``logit(shifted) = slope * logit(reference) + intercept``), the gap between that average and the fit's prediction.
    """
    if not shifted_accuracies:
        raise ValueError("effective robustness needs at least one shifted-set accuracy")
    average = sum(shifted_accuracies.values()) / len(shifted_accuracies)
    result = {"shifted_average": average}
    if slope is not None and intercept is not None:
        predicted = 1 / (1 + math.exp(-(slope * logit(reference_accuracy) + intercept)))
        result.update(baseline_prediction=predicted, effective_robustness=average - predicted)
    return result
