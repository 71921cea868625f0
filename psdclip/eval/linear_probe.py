"""Linear probe (the CLIP paper's protocol): L2-regularised multinomial logistic regression on frozen features,
fitted with L-BFGS; the regularisation is chosen on a held-out part of train by a coarse-to-fine sweep, then the
probe is refitted on all of train. Runs on whichever device the features are on.

The objective is scikit-learn's ``LogisticRegression(C=C)`` for three or more classes, scaled by 1/n:
mean cross-entropy + ||W||² / (2 C n), intercepts unpenalised — so the fitted probe matches scikit-learn's.
"""

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from psdclip.eval.zeroshot import classification_metrics

log = logging.getLogger(__name__)


@dataclass
class LinearClassifier:
    weight: Tensor  # (classes, dim)
    bias: Tensor  # (classes,)

    def logits(self, features: Tensor) -> Tensor:
        return features.to(self.weight) @ self.weight.T + self.bias


def fit_logistic_regression(features: Tensor, labels: Tensor, num_classes: int, C: float, max_iter: int = 1000,
                            tol: float = 1e-6, init: LinearClassifier | None = None) -> LinearClassifier:
    """Minimise mean cross-entropy + ||W||² / (2 C n) with L-BFGS (strong-Wolfe line search), from ``init`` or zeros."""
    features = features.float() if features.dtype not in (torch.float32, torch.float64) else features
    labels = labels.to(features.device)
    n, dim = features.shape
    weight = (init.weight.clone() if init else features.new_zeros(num_classes, dim)).requires_grad_()
    bias = (init.bias.clone() if init else features.new_zeros(num_classes)).requires_grad_()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=10, tolerance_grad=tol,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + weight.square().sum() / (2 * C * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return LinearClassifier(weight.detach(), bias.detach())


def accuracy(classifier: LinearClassifier, features: Tensor, labels: Tensor) -> float:
    return (classifier.logits(features).argmax(dim=1).cpu() == labels.cpu()).float().mean().item()


def select_C(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], num_classes: int, log10_range=(-6.0, 6.0),
             coarse_step: float = 2.0, refinements: int = 3, max_iter: int = 1000) -> tuple[float, dict[float, float]]:
    """The C with the best held-out top-1: a coarse grid over ``log10_range``, then ``refinements`` rounds that try
    half the previous step either side of the best so far. Ties go to the smaller C (stronger regularisation).
    Returns the chosen C and every C tried with its held-out accuracy."""
    tried: dict[float, float] = {}
    previous = None

    def score(log_c: float) -> float:
        nonlocal previous
        if log_c not in tried:  # warm-started from the last fit: the same convex problem, fewer iterations
            previous = fit_logistic_regression(*train, num_classes, 10.0 ** log_c, max_iter, init=previous)
            tried[log_c] = accuracy(previous, *val)
        return tried[log_c]

    low, high = log10_range
    grid = [low + i * coarse_step for i in range(int(math.floor((high - low) / coarse_step)) + 1)]
    best = max(grid, key=lambda c: (score(c), -c))
    step = coarse_step
    for _ in range(refinements):
        step /= 2
        candidates = [c for c in (best - step, best, best + step) if low <= c <= high]
        best = max(candidates, key=lambda c: (score(c), -c))
    return 10.0 ** best, {10.0 ** c: acc for c, acc in sorted(tried.items())}


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, num_classes: int,
                 val_fraction: float = 0.2, seed: int = 0, device=None, **sweep) -> dict[str, float]:
    """Choose C on a seeded ``val_fraction`` of train, refit on all of train, report test top-1/top-5/mean per-class recall and C."""
    device = device or train_features.device
    train_features, train_labels = train_features.to(device), train_labels.to(device)
    order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(seed)).to(device)
    held_out = max(1, int(len(order) * val_fraction))
    val, fit = order[:held_out], order[held_out:]
    C, tried = select_C((train_features[fit], train_labels[fit]), (train_features[val], train_labels[val]), num_classes, **sweep)
    log.info("linear probe: C=%.3g chosen from %s", C, {f"{c:.3g}": round(a, 4) for c, a in tried.items()})
    classifier = fit_logistic_regression(train_features, train_labels, num_classes, C, sweep.get("max_iter", 1000))
    metrics = classification_metrics(classifier.logits(test_features.to(device)).float().cpu(), test_labels.cpu())
    return {**metrics, "C": C}
