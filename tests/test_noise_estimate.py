"""The noise estimate on constructed memories whose truth is known (issue 44): threshold pairs whose donor caption
fits their image behave as clean pairs, the range's low end corrects for their share, and the range holds the truth."""

import numpy as np
import pytest
import torch

from psdclip.subsets import MemorySubset, noise_estimate
from tests.helpers.losses import memory_rule


def remembered(own: list[float] | np.ndarray, planted: list[float] | np.ndarray) -> MemorySubset:
    """The memory rule of a run whose memory holds these remembered gaps (each pair seen 6 times)."""
    # the study's settings, with a binomial range (overdispersion 1), as the constructed gaps are drawn
    rule = memory_rule(slots=None, min_sightings=6, quantile=0.2, refresh_every=10, ramp=2.0, clean_quantile=0.1)
    gaps = torch.tensor([*own, *planted], dtype=torch.float32)
    rule.memory.allocate(len(gaps))
    rule.memory.scores.copy_(gaps.to(torch.float16))
    rule.memory.sightings.fill_(6)
    rule.memory.planted[len(own) :] = True
    return rule


def test_threshold_pairs_whose_donor_fits_are_corrected_for():
    """100 own pairs: 60 clean (gap 0), 40 wrong (gaps 1, 2, 3, 4, ten each): π = 0.4. 40 threshold pairs: 36 wrong
    as the data's (nine of each gap) and 4 whose donor fits (gap 0): ρ = 0.1. Past their median (2): 20 of the 100
    own pairs and 18 of the 40 threshold pairs, the ratio a = 0.2/0.45 = 4/9 = π/(1 − ρ), the old estimate, high by
    1/(1 − ρ). Below the data's lowest tenth (0): 60 own pairs and 4 threshold pairs, b = 0.1/0.6 = ρ/(1 − π), and
    a(1 − b)/(1 − ab) = (4/9)(5/6)/(1 − 4/54) = 0.4, the truth: the range runs from it to the ratio, each widened by
    1.96 of their relative binomial error, √(0.55/(0.45·40) + 0.8/(0.2·100))."""
    rule = remembered([0.0] * 60 + [1.0, 2.0, 3.0, 4.0] * 10, [0.0] * 4 + [1.0, 2.0, 3.0, 4.0] * 9)
    statistics = {name: value.item() for name, value in rule.epoch_statistics().items()}
    relative = (0.55 / (0.45 * 40) + 0.8 / (0.2 * 100)) ** 0.5
    assert statistics["noise_estimate_low"] == pytest.approx(0.4 * (1 - 1.96 * relative), abs=1e-6)
    assert statistics["noise_estimate_high"] == pytest.approx(4 / 9 * (1 + 1.96 * relative), abs=1e-6)
    assert statistics["noise_estimate"] == pytest.approx((0.4 + 4 / 9) / 2, abs=1e-6)
    assert statistics["noise_estimate_se"] == pytest.approx((0.4 + 4 / 9) / 2 * relative, abs=1e-6)


def test_without_fitting_donors_the_range_is_one_reading_widened():
    estimate = noise_estimate(*map(torch.tensor, (0.2, 0.5, 0.6, 0.0, 1000.0, 40.0)))
    relative = (0.5 / (0.5 * 40) + 0.8 / (0.2 * 1000)) ** 0.5
    assert estimate["noise_estimate"].item() == pytest.approx(0.4)
    assert estimate["noise_estimate_low"].item() == pytest.approx(0.4 * (1 - 1.96 * relative))


def test_when_no_mixture_explains_the_low_gaps_the_ratio_is_returned():
    """a·b ≥ 1: the low gaps hold more threshold pairs than own pairs (π + ρ ≥ 1), which the correction cannot undo."""
    estimate = noise_estimate(*map(torch.tensor, (0.4, 0.5, 0.25, 0.5, 1000.0, 40.0)))
    assert estimate["noise_estimate"].item() == pytest.approx(0.8) and estimate["noise_estimate_high"].item() == 1.0


def constructed_runs(truth: float, runs: int = 300):
    """Runs of the study's size: 1,500 own pairs, a share ``truth`` wrong, and 45 threshold pairs of which a tenth got a
    fitting donor. Clean gaps fall near 0 (exponential, mean 0.5 logits), wrong ones near 3 (normal, sd 1); a few clean
    pairs still lie past the cut-off, as in a trained model. Each run: (own gaps, threshold pairs' gaps, the truth)."""
    rng = np.random.default_rng(int(truth * 10))
    for _ in range(runs):
        wrong = rng.random(1500) < truth
        own = np.where(wrong, rng.normal(3.0, 1.0, 1500).clip(0), rng.exponential(0.5, 1500))
        fits = rng.random(45) < 0.1
        yield own, np.where(fits, rng.exponential(0.5, 45), rng.normal(3.0, 1.0, 45).clip(0)), wrong.mean()


@pytest.mark.parametrize("truth", [0.2, 0.4, 0.6])
def test_the_range_holds_the_truth_and_its_middle_is_unbiased(truth):
    """The range holds the truth in 90% of the runs or more; the ratio alone, the old estimate, reads high by about the
    fitting donors' share, and the range's middle, half-way to the corrected reading, is nearer the truth."""
    errors, held, ratio_errors = [], [], []
    for own, planted, wrong in constructed_runs(truth):
        statistics = {name: value.item() for name, value in remembered(own, planted).epoch_statistics().items()}
        errors.append(statistics["noise_estimate"] - wrong)
        held.append(statistics["noise_estimate_low"] - 1e-3 <= wrong <= statistics["noise_estimate_high"] + 1e-3)
        cut = np.sort(planted)[22]  # the median of 45 (below 256 threshold pairs the cut-off is their median)
        ratio_errors.append((own > cut).mean() / (planted > cut).mean() - wrong)
    assert np.mean(held) >= 0.9  # (fp16 memory: 1e-3 slack above)
    assert np.mean(ratio_errors) > truth * 0.05  # high by about ρ/(1 − ρ) of the truth
    assert 0 < np.mean(errors) < np.mean(ratio_errors)


def test_on_clean_data_the_estimate_reads_near_zero():
    """No wrong caption: the estimate is the share of clean pairs still past the cut-off (which look wrong), under a
    point; no correction can tell them from wrong ones, so the range may miss the exact 0 by that much."""
    statistics = [remembered(own, planted).epoch_statistics() for own, planted, _ in constructed_runs(0.0, 100)]
    assert 0 <= np.mean([s["noise_estimate"].item() for s in statistics]) < 0.01


def test_overdispersion_widens_the_range_by_its_factor():
    shares = map(torch.tensor, (0.2, 0.5, 0.6, 0.0, 1000.0, 40.0))
    binomial, wider = (
        noise_estimate(*shares),
        noise_estimate(*map(torch.tensor, (0.2, 0.5, 0.6, 0.0, 1000.0, 40.0)), 1.25),
    )
    relative = (0.5 / (0.5 * 40) + 0.8 / (0.2 * 1000)) ** 0.5
    assert wider["noise_estimate"] == binomial["noise_estimate"]
    assert wider["noise_estimate_high"].item() == pytest.approx(0.4 * (1 + 1.96 * 1.25 * relative))
    assert wider["noise_estimate_se"].item() == pytest.approx(0.4 * 1.25 * relative)
