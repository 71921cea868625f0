"""Effective robustness (Taori et al. 2020): shifted-set accuracy beyond what a baseline fit predicts from ImageNet accuracy."""

import math

import numpy as np


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def baseline_prediction(reference_accuracy: float, slope: float, intercept: float) -> float:
    """The shifted-set accuracy the baseline's logit-space fit predicts at this reference accuracy."""
    return 1 / (1 + math.exp(-(slope * logit(reference_accuracy) + intercept)))


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
        predicted = baseline_prediction(reference_accuracy, slope, intercept)
        result.update(baseline_prediction=predicted, effective_robustness=average - predicted)
    return result


def baseline_fit(reference_accuracies: list[float], shifted_accuracies: list[float]) -> tuple[float, float]:
    """The baseline's linear fit in logit space (least squares), ``logit(shifted) = slope * logit(reference) +
    intercept``, from its models' accuracies on the reference and the shifted set: (slope, intercept)."""
    if len(reference_accuracies) != len(shifted_accuracies) or len(set(reference_accuracies)) < 2:
        raise ValueError(
            "a baseline fit needs paired accuracies of at least two models with different reference accuracy"
        )
    slope, intercept = np.polyfit([logit(p) for p in reference_accuracies], [logit(p) for p in shifted_accuracies], 1)
    return float(slope), float(intercept)
