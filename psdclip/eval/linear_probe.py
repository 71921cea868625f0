"""Linear probe (the CLIP paper's protocol): L2-regularised multinomial logistic regression on frozen features,
fitted with L-BFGS; the regularisation is chosen on a held-out part of train by a coarse-to-fine sweep, then the
probe is refitted on all of train. Runs on whichever device the features are on.

The objective is scikit-learn's ``LogisticRegression(C=C)`` for three or more classes, scaled by 1/n:
mean cross-entropy + ||W||² / (2 C n), intercepts unpenalised — so the fitted probe matches scikit-learn's.
"""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from psdclip.eval.zeroshot import classification_metrics

log = logging.getLogger(__name__)

CHECK_EVERY = 50  # L-BFGS iterations between convergence checks of a fit


@dataclass
class LinearClassifier:
    weight: Tensor  # (classes, dim)
    bias: Tensor  # (classes,)

    def logits(self, features: Tensor) -> Tensor:
        return features.to(self.weight) @ self.weight.T + self.bias


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    C: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: LinearClassifier | None = None,
    settled: Callable[[LinearClassifier], bool] | None = None,
) -> LinearClassifier:
    """Minimise mean cross-entropy + ||W||² / (2 C n) with L-BFGS (strong-Wolfe line search), from ``init`` or zeros.
    ``settled``, asked every ``CHECK_EVERY`` iterations, may end the fit early (the C search stops once held-out
    predictions stop changing: weakly regularised fits creep on for hundreds of iterations without changing them).

    L-BFGS runs on centred features scaled per dimension by 1 / sqrt(variance + 1 / (C n)), with W and b
    reparametrised to match: the same objective and minimum, but far better conditioned (CLIP features share a large
    mean direction and are unevenly spread), so weakly regularised fits converge in a fraction of the iterations."""
    features = features.float() if features.dtype not in (torch.float32, torch.float64) else features
    labels = labels.to(features.device)
    n, dim = features.shape
    mean = features.mean(dim=0)
    scale = (features.var(dim=0, unbiased=False) + 1.0 / (C * n)).rsqrt()
    scaled = (features - mean) * scale
    # logits = x·Wᵀ + b = ((x - mean)·scale)·Vᵀ + c  with  W = V·scale,  b = c - V·(mean·scale)
    start = init or LinearClassifier(features.new_zeros(num_classes, dim), features.new_zeros(num_classes))
    weight = (start.weight.to(features) / scale).requires_grad_()
    bias = (start.bias.to(features) + start.weight.to(features) @ mean).requires_grad_()
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=min(max_iter, CHECK_EVERY),
        history_size=10,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )
    evaluations = 0

    def objective():
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad()
        penalty = (weight * scale).square().sum() / (2 * C * n)
        loss = F.cross_entropy(torch.addmm(bias, scaled, weight.T), labels) + penalty
        loss.backward()
        return loss

    def current() -> LinearClassifier:
        return LinearClassifier(weight.detach() * scale, bias.detach() - weight.detach() @ (mean * scale))

    with torch.enable_grad():
        for _ in range(math.ceil(max_iter / CHECK_EVERY)):  # L-BFGS keeps its history from one step call to the next
            before = evaluations
            optimizer.step(objective)
            if evaluations - before <= 1 or (settled is not None and settled(current())):
                break  # converged (a step that only evaluates returns at once), or settled enough for the caller
    return current()


def accuracy(classifier: LinearClassifier, features: Tensor, labels: Tensor) -> float:
    return (classifier.logits(features).argmax(dim=1).cpu() == labels.cpu()).float().mean().item()


class PredictionsSettled:
    """True once the predicted classes of ``features`` are the same at two checks in a row."""

    def __init__(self, features: Tensor):
        self.features, self.previous = features, None

    def __call__(self, classifier: LinearClassifier) -> bool:
        predictions = classifier.logits(self.features).argmax(dim=1)
        settled = self.previous is not None and torch.equal(predictions, self.previous)
        self.previous = predictions
        return settled


def select_C(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    num_classes: int,
    log10_range=(-6.0, 6.0),
    coarse_step: float = 2.0,
    refinements: int = 3,
    max_iter: int = 1000,
    patience: int | None = 2,
    fits: dict[float, LinearClassifier] | None = None,
) -> tuple[float, dict[float, float]]:
    """The C with the best held-out top-1: a coarse grid over ``log10_range``, then ``refinements`` rounds that try
    half the previous step either side of the best so far. Ties go to the smaller C (stronger regularisation).
    The grid goes from strong to weak regularisation and stops once ``patience`` grid points since the best score below
    it (None: the whole grid): held-out accuracy rises and falls with C, and the weakest-regularised fits are the
    slowest by far.
    Returns the chosen C and every C tried with its held-out accuracy; ``fits``, when given, receives every
    classifier fitted, by C."""
    tried: dict[float, float] = {}
    fitted: dict[float, LinearClassifier] = {}

    def score(log_c: float) -> float:
        if log_c not in tried:
            # warm-started from the fit of the nearest C tried: nearly the same problem, few iterations
            nearest = min(fitted, key=lambda other: abs(other - log_c), default=None)
            started = time.perf_counter()
            fitted[log_c] = fit_logistic_regression(
                *train, num_classes, 10.0**log_c, max_iter, init=fitted.get(nearest), settled=PredictionsSettled(val[0])
            )
            tried[log_c] = accuracy(fitted[log_c], *val)
            log.info(
                "linear probe: C=%.3g held-out top-1 %.4f (%.1f s)",
                10.0**log_c,
                tried[log_c],
                time.perf_counter() - started,
            )
        return tried[log_c]

    low, high = log10_range
    grid = [low + i * coarse_step for i in range(math.floor((high - low) / coarse_step) + 1)]
    best, below = grid[0], 0
    for log_c in grid:
        if score(log_c) > score(best):
            best, below = log_c, 0
        elif score(log_c) < score(best):  # a tie (e.g. chance level at the strong end) is not past the peak
            below += 1
            if patience is not None and below >= patience:
                break
    step = coarse_step
    for _ in range(refinements):
        step /= 2
        candidates = [c for c in (best - step, best, best + step) if low <= c <= high]
        best = max(candidates, key=lambda c: (score(c), -c))
    if fits is not None:
        fits.update({10.0**c: classifier for c, classifier in fitted.items()})
    return 10.0**best, {10.0**c: acc for c, acc in sorted(tried.items())}


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    device=None,
    **sweep,
) -> dict[str, float]:
    """Choose C on a seeded ``val_fraction`` of train, refit on all of train, report test top-1/top-5/mean per-class recall and C."""
    device = device or train_features.device
    train_features, train_labels = train_features.to(device), train_labels.to(device)
    order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(seed)).to(device)
    held_out = max(1, int(len(order) * val_fraction))
    val, fit = order[:held_out], order[held_out:]
    fits: dict[float, LinearClassifier] = {}
    C, tried = select_C(
        (train_features[fit], train_labels[fit]),
        (train_features[val], train_labels[val]),
        num_classes,
        max_iter=max_iter,
        fits=fits,
        **sweep,
    )
    log.info(
        "linear probe: C=%.3g chosen from %s; refitting on all %d training samples",
        C,
        {f"{c:.3g}": round(a, 4) for c, a in tried.items()},
        len(train_labels),
    )
    # from the search's fit at C: the same problem on 1/(1 - val_fraction) times the data
    classifier = fit_logistic_regression(train_features, train_labels, num_classes, C, max_iter, init=fits[C])
    metrics = classification_metrics(classifier.logits(test_features.to(device)).float().cpu(), test_labels.cpu())
    return {**metrics, "C": C}
