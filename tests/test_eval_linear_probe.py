"""The torch L-BFGS linear probe against scikit-learn's LogisticRegression on the same features."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from psdclip.eval.linear_probe import fit_logistic_regression, linear_probe, select_C


def blobs(n=240, dim=12, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    labels = (features[:, :classes] + 0.7 * torch.randn(n, classes, generator=generator, dtype=torch.float64)).argmax(
        dim=1
    )
    return features, labels


@pytest.mark.parametrize("C", [0.05, 1.0, 50.0])
def test_fit_matches_sklearn(C):
    x, y = blobs()
    probe = fit_logistic_regression(x, y, 4, C)
    reference = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(probe.weight.numpy(), reference.coef_, atol=2e-4)
    np.testing.assert_allclose(torch.softmax(probe.logits(x), 1).numpy(), reference.predict_proba(x.numpy()), atol=2e-4)


def test_sweep_and_refit_match_sklearn_at_the_chosen_C():
    x, y = blobs(n=300, seed=1)
    train_x, train_y, test_x, test_y = x[:200], y[:200], x[200:], y[200:]
    metrics = linear_probe(train_x, train_y, test_x, test_y, num_classes=4)
    reference = LogisticRegression(C=metrics["C"], tol=1e-10, max_iter=10_000).fit(train_x.numpy(), train_y.numpy())
    assert metrics["top1"] == pytest.approx((reference.predict(test_x.numpy()) == test_y.numpy()).mean())
    assert set(metrics) == {"top1", "mean_per_class_recall", "C"}


def test_select_C_refines_around_the_best_coarse_value():
    x, y = blobs(n=200, seed=2)
    C, tried = select_C((x[:150], y[:150]), (x[150:], y[150:]), 4, log10_range=(-4, 4), coarse_step=2, refinements=2)
    assert all(1e-4 <= c <= 1e4 for c in tried)
    assert {1e-4, 1e-2, 1.0, 1e2, 1e4} <= {round(c, 10) for c in tried}
    assert len(tried) > 5  # the fine steps were tried
    best = max(tried.values())
    assert tried[C] == best and C == min(c for c, acc in tried.items() if acc == best)


def test_the_coarse_grid_stops_past_the_peak_but_not_on_a_plateau():
    def search(x, y, patience):
        return select_C((x[:90], y[:90]), (x[90:], y[90:]), 4, (-4, 4), 1, 0, patience=patience)

    x, y = blobs(n=120, dim=40, seed=0)  # held-out top-1 peaks at C = 0.01, then falls
    whole, early = search(x, y, None), search(x, y, 2)
    assert early[0] == whole[0] == pytest.approx(0.01)
    assert sorted(early[1]) == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])  # two past the peak, then no more fits
    assert len(whole[1]) == 9
    x, y = blobs(n=120, dim=40, seed=2)  # starts flat (a tie is not "past the peak"), peaks at C = 1
    assert search(x, y, 1)[0] == search(x, y, None)[0] == pytest.approx(1.0)


def test_float32_features_work():
    x, y = blobs()
    probe = fit_logistic_regression(x.float(), y, 4, 1.0)
    assert probe.weight.dtype == torch.float32
    assert (probe.logits(x.float()).argmax(1) == y).float().mean() > 0.6
