import pytest
import torch
import torch.nn.functional as F

from psdclip.memory import PairMemory
from psdclip.subsets import (
    RULES,
    ListedSubset,
    OutscoredSubset,
    SubsetQuery,
    SubsetRule,
    largest,
    lowest,
    partner_gap,
)
from tests.helpers.losses import doubt_rule, make_loss, memory_rule, outscored_rule, planted_batch, random_rule


def query_of(image, text, alpha, scale=20.0, step=0, total_steps=10, **pairs) -> SubsetQuery:
    logits = scale * image @ text.T
    n = len(image)
    count = torch.tensor(int(alpha * n))
    return SubsetQuery(logits, logits.T, torch.arange(n), count, step, total_steps, **pairs)


def test_every_rule_is_registered_under_its_config_name():
    from pathlib import Path

    configs = {path.stem for path in Path("conf/loss/subset").glob("*.yaml")}
    assert set(RULES) == configs
    assert all(issubclass(rule, SubsetRule) for rule in RULES.values())


def test_random_subset_is_reproducible_and_varies_by_step():
    image, text = planted_batch(n=100)
    draw = lambda rule, step: rule(query_of(image, text, 0.37, step=step)).chosen
    first, again, later = draw(random_rule(4), 5), draw(random_rule(4), 5), draw(random_rule(4), 6)
    assert first.sum() == 37 and torch.equal(first, again) and not torch.equal(first, later)
    assert not torch.equal(first, draw(random_rule(5), 5))


@pytest.mark.parametrize("teacher", ["self", "ema"])
def test_doubt_picks_the_planted_corrupted_pairs(teacher):
    planted = (2, 5, 11)
    image, text = planted_batch(corrupted=planted)
    loss = make_loss(doubt_rule(), alpha_max=3 / 16)
    teacher_features = {"image_features": image, "text_features": text, "logit_scale": torch.tensor(20.0)}
    # the student is random: D follows the teacher (the student's own logits without a teacher)
    student = planted_batch(seed=7, corrupted=()) if teacher == "ema" else (image, text)
    out = loss(*student, torch.tensor(20.0), 0, 10, teacher_features=teacher_features if teacher == "ema" else None)
    assert torch.nonzero(out.subset.chosen).flatten().tolist() == list(planted)


def test_ties_go_to_the_lower_index():
    assert lowest(torch.tensor([0.5, 0.1, 0.1, 0.9, 0.1]), 2).tolist() == [False, True, True, False, False]
    assert largest(torch.tensor([0.5, 0.9, 0.9, 0.1, 0.9]), torch.tensor(2)).tolist() == [
        False,
        True,
        True,
        False,
        False,
    ]


def test_doubt_without_a_teacher_over_the_batch_truncates_the_doubted_pairs():
    """Soft target = the row's own prediction: doubted rows carry no gradient (loss truncation), the others are CLIP's."""
    image, text = planted_batch()
    logits = (20 * image @ text.T).requires_grad_(True)
    out = make_loss(doubt_rule(), alpha_max=0.25).from_logits(logits, logits.T, torch.arange(16), 0, 10)
    out.loss.backward()
    doubted = out.subset.chosen
    assert doubted.sum() == 4
    assert logits.grad[doubted][:, doubted].abs().max() < 1e-7  # no pull between two doubted pairs, either direction
    keep = ~doubted
    clip_rows = (
        0.5
        * (
            F.cross_entropy(logits[keep], torch.arange(16)[keep], reduction="sum")
            + F.cross_entropy(logits.T[keep], torch.arange(16)[keep], reduction="sum")
        )
        / 16
    )
    (reference,) = torch.autograd.grad(clip_rows, logits)
    torch.testing.assert_close(logits.grad, reference, atol=1e-7, rtol=1e-5)


def concept_batch(seed=0):
    """16 pairs in 4 concepts of 4 near-identical captions. Concept 0's images are barely aligned with its captions
    (a concept that is hard to see); pair 9's caption names concept 3 while its image shows concept 2 (a wrong caption)."""
    g = torch.Generator().manual_seed(seed)
    concepts = F.normalize(torch.randn(4, 64, generator=g), dim=-1)
    group = torch.arange(16) // 4
    text = F.normalize(concepts[group] + 0.01 * torch.randn(16, 64, generator=g), dim=-1)
    noise = torch.randn(16, 64, generator=g)
    text[9] = F.normalize(concepts[3] + 0.01 * torch.randn(64, generator=g), dim=-1)
    basis = torch.linalg.qr(concepts.T).Q  # noise orthogonal to every concept: it moves no image towards a caption
    noise = F.normalize(noise - noise @ basis @ basis.T, dim=-1)
    image = F.normalize(concepts[group] + torch.where(group == 0, 4.0, 0.3)[:, None] * noise, dim=-1)
    return image, text


def test_partner_gap_equals_a_hand_computation():
    logits = torch.tensor([[3.0, 5.0, 1.0], [2.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
    # image→text: best − own = 5 − 3, 4 − 4, 1 − 1; text→image (columns): 3 − 3, 5 − 4, 1 − 1
    torch.testing.assert_close(partner_gap(logits, logits.T, torch.arange(3)), torch.tensor([1.0, 0.5, 0.0]))


def test_the_loss_tempers_the_rule_s_evidence_by_tau_teacher():
    """The rule sees the teacher's logits / tau_teacher: pairs 0 and 1 are outscored by 1.5 logits in one direction
    (0.75 on average): under the margin of 1 at tau 1, past it (1.5) at tau 0.5."""
    logits = torch.tensor([[1.0, 2.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    for tau, chosen in ((1.0, []), (0.5, [0, 1])):
        loss = make_loss(OutscoredSubset(margin=1.0, ramp=0.0), alpha_max=0.9, tau_teacher=tau)
        out = loss.from_logits(logits, logits.T.contiguous(), torch.arange(3), 0, 10)
        assert torch.nonzero(out.subset.chosen).flatten().tolist() == chosen


def test_outscored_picks_the_wrong_caption_not_the_pairs_of_a_hard_concept():
    image, text = concept_batch()
    chosen = {
        name: torch.nonzero(rule(query_of(image, text, 0.25)).chosen).flatten().tolist()
        for name, rule in (("doubt", doubt_rule()), ("outscored", outscored_rule(margin=2.0)))
    }
    # the fixed-count rule fills its quota of 4 with clean pairs of the hard concept 0 and of concept 3; only pair 9
    # has a candidate that outscores it by more than the margin
    assert chosen["doubt"] == [2, 3, 9, 15]
    assert chosen["outscored"] == [9]


def test_outscored_takes_at_most_alpha_n_pairs_largest_gap_first():
    image, text = planted_batch(corrupted=(2, 5, 11))
    query = query_of(image, text, 2 / 16)
    gap = partner_gap(query.teacher_image, query.teacher_text, query.labels)
    chosen = outscored_rule(margin=0.5)(query).chosen
    assert chosen.sum() == 2 and set(torch.nonzero(chosen).flatten().tolist()) <= {2, 5, 11}
    assert gap[chosen].min() >= gap[~chosen].max()


@pytest.mark.parametrize(
    "settings,message", [({"margin": -1}, "margin must be >= 0, got -1"), ({"ramp": -2}, "ramp must be >= 0, got -2")]
)
def test_negative_outscored_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        OutscoredSubset(**{"margin": 2.0, "ramp": 0.0, **settings})


def test_outscored_ramp_weights_each_pair_s_soft_target_by_its_gap_past_the_margin():
    # image k scores caption k+1 2k logits above its own caption (gap 2k image→text); the text→image gaps follow
    n, margin, ramp = 6, 1.0, 4.0
    logits = torch.zeros(n, n, dtype=torch.float64)
    for k in range(n):
        logits[k, (k + 1) % n] = 2.0 * k
    loss = make_loss(OutscoredSubset(margin=margin, ramp=ramp), alpha_max=0.99, mix=0.8)
    out = loss.from_logits(logits, logits.T.contiguous(), torch.arange(n), 0, 10)
    gap = torch.tensor([2.0 * k for k in range(n)], dtype=torch.float64)
    gap = (gap + torch.stack([logits[:, k].max() - logits[k, k] for k in range(n)])) / 2  # mean of the two directions
    weight = ((gap - margin) / ramp).clamp(0, 1) * (gap > margin)
    torch.testing.assert_close(out.subset.weight, weight.to(out.subset.weight.dtype))
    assert out.subset.chosen.tolist() == (gap > margin).tolist()
    # the targets the loss used: each distilled row mixes its own one-hot back in by 1 − its weight
    soft = logits.softmax(dim=1)
    for row in range(n):
        one_hot = F.one_hot(torch.tensor(row), n).to(soft.dtype)
        expected = 0.8 * weight[row] * soft[row] + (1 - 0.8 * weight[row]) * one_hot
        torch.testing.assert_close(out.targets_per_image[row].double(), expected, rtol=1e-6, atol=1e-6)


# ---- the pair memory and its rule ------------------------------------------------------------------------------


def gap_query(gaps, ids, step, total_steps=100, alpha=0.5, planted=None) -> SubsetQuery:
    """A batch whose pairs have the given teacher gaps: pair i's caption is beaten by another by gaps[i] logits in
    both directions (a cyclic shift carries the beating candidate)."""
    n = len(gaps)
    logits = torch.zeros(n, n)
    for i, gap in enumerate(gaps):
        logits[i, (i + 1) % n] = gap
    # text→image: make each column's best rival beat the pair by the same gap
    per_text = torch.zeros(n, n)
    for i, gap in enumerate(gaps):
        per_text[i, (i + 1) % n] = gap
    return SubsetQuery(
        logits,
        per_text,
        torch.arange(n),
        torch.tensor(int(alpha * n)),
        step,
        total_steps,
        torch.as_tensor(ids),
        torch.as_tensor(planted) if planted is not None else None,
    )


def test_the_memory_keeps_an_exponential_average_per_pair():
    memory = PairMemory(decay=0.5, slots=10)
    average, sightings = memory.record(torch.tensor([3, 7]), torch.tensor([4.0, 1.0]))
    assert average.tolist() == [4.0, 1.0] and sightings.tolist() == [1, 1]
    average, sightings = memory.record(torch.tensor([7, 3]), torch.tensor([3.0, 0.0]))
    assert average.tolist() == [2.0, 2.0] and sightings.tolist() == [2, 2]  # 0.5·1 + 0.5·3, 0.5·4 + 0.5·0
    assert memory.collisions == 0 and memory.nbytes_per_slot() == 8


def test_hashed_identities_that_meet_in_a_slot_are_counted_and_the_newcomer_takes_it():
    memory = PairMemory(decay=0.5, slots=8)
    # 3, 11 and 19 share slot 3; 4 and 12 share slot 4; 5 is alone
    memory.record(torch.tensor([3, 4, 5]), torch.tensor([1.0, 1.0, 1.0]))
    memory.record(torch.tensor([3, 4, 5]), torch.tensor([1.0, 1.0, 1.0]))  # the same pairs again: no collision
    assert memory.collisions == 0
    average, sightings = memory.record(torch.tensor([11, 12, 5]), torch.tensor([5.0, 5.0, 3.0]))
    assert memory.collisions == 2
    assert average.tolist() == [5.0, 5.0, 2.0] and sightings.tolist() == [1, 1, 3]  # the newcomers start afresh
    memory.record(torch.tensor([19]), torch.tensor([0.0]))
    assert memory.collisions == 3


def test_the_memory_rule_catches_wrong_captions_that_recur_and_leaves_a_hard_clean_pair_alone():
    """Four pairs over ten epochs: pair 0's caption is wrong (the teacher misplaces it every time, by 2–3 logits),
    pair 1 is a hard clean pair (misplaced by 3 logits once, then learnt), pairs 2 and 3 are easy."""
    rule = memory_rule(min_sightings=3, margin=1.0)
    epochs = [[2.5, 3.0, 0.0, 0.0]] + [[2.0 + 0.1 * e, 0.2, 0.0, 0.0] for e in range(1, 10)]
    chosen = [rule(gap_query(gaps, [0, 1, 2, 3], step=epoch)).chosen.tolist() for epoch, gaps in enumerate(epochs)]
    assert all(epoch == [False] * 4 for epoch in chosen[:2])  # too few sightings, and the fallback not yet open
    assert all(epoch == [True, False, False, False] for epoch in chosen[2:])
    # the single-batch rule would have taken the hard clean pair in its bad epoch, had it been open
    assert outscored_rule(margin=2.0)(gap_query(epochs[0], [0, 1, 2, 3], step=0)).chosen.tolist()[1]


def test_the_fallback_takes_pairs_with_too_few_sightings_once_open():
    rule = memory_rule(min_sightings=3, fallback_start=0.5)
    before = rule(gap_query([3.0, 0.0, 0.0, 0.0], [0, 1, 2, 3], step=10, total_steps=101)).chosen
    after = rule(gap_query([3.0, 0.0, 0.0, 0.0], [4, 5, 6, 7], step=50, total_steps=101)).chosen
    assert before.tolist() == [False] * 4 and after.tolist() == [True, False, False, False]


def test_the_threshold_calibrates_on_the_threshold_pairs_and_estimates_the_noise():
    """24 pairs a batch: 12 clean (gap 0), 8 wrong (gaps 2, 2.5, 3, 3.5, twice), 4 planted, wrong in the same way
    (2, 2.5, 3, 3.5). D's cut-off is the planted pairs' 20th percentile (2, by rank), so D = the wrong and planted
    pairs above it. The planted median is 2.5: half the planted pairs are past it, and 4 of the data's own 20, so
    the estimate of the wrong share is (4/20) / (2/4) = 0.4 = 8/20, with a standard error from the two binomial shares,
    0.4·√(0.5/(0.5·4) + 0.8/(0.2·20)). No threshold pair sits among the data's lowest gaps: nothing to correct."""
    rule = memory_rule(quantile=0.2, min_sightings=2)
    gaps = [0.0] * 12 + [2.0, 2.5, 3.0, 3.5] * 2 + [2.0, 2.5, 3.0, 3.5]
    planted = [False] * 20 + [True] * 4
    for step in range(3):
        chosen = rule(gap_query(gaps, list(range(24)), step=step, alpha=0.9, planted=planted)).chosen
    assert rule.threshold.item() == pytest.approx(2.0)
    assert torch.nonzero(chosen).flatten().tolist() == [13, 14, 15, 17, 18, 19, 21, 22, 23]
    statistics = rule.epoch_statistics()
    assert statistics["flagged_share"].item() == pytest.approx(6 / 20)
    assert statistics["noise_estimate"].item() == pytest.approx(8 / 20)
    assert statistics["noise_estimate_se"].item() == pytest.approx(0.4 * (0.5 / (0.5 * 4) + 0.8 / (0.2 * 20)) ** 0.5)
    assert statistics["memory_collisions"] == 0


def test_with_many_threshold_pairs_the_estimate_cuts_into_their_tail_past_the_clean_pairs_near_the_median():
    """400 threshold pairs with gaps 0.01, 0.02, …, 4.00; the data's own 500 pairs: 200 wrong captions that stand
    where the threshold pairs do (0.02, 0.04, …, 4.00), 280 clean pairs at 0 and 20 hard clean ones at 2.2, past the
    threshold pairs' median (2.00) but not their 1 − 8/√400 = 0.6 quantile (2.40). Past 2.40 lie 160 of the 400
    threshold pairs and 80 of the 500 own pairs, all wrong: (80/500) / (160/400) = 0.4, the truth. The median would
    count the 20 hard clean pairs: (120/500) / (200/400) = 0.48."""
    planted_gaps = [i / 100 for i in range(1, 401)]
    own_gaps = [i / 100 for i in range(2, 401, 2)] + [0.0] * 280 + [2.2] * 20
    gaps = own_gaps + planted_gaps
    planted = [False] * 500 + [True] * 400

    def estimate(estimate_tail: float) -> dict:
        rule = memory_rule(quantile=0.2, min_sightings=1, slots=1024, estimate_tail=estimate_tail)
        rule(gap_query(gaps, list(range(900)), step=0, alpha=0.9, planted=planted))
        return rule.epoch_statistics()

    statistics = estimate(8.0)
    assert statistics["noise_estimate"].item() == pytest.approx(0.4, abs=1e-6)
    # the binomial errors of the shares past the cut-off: 160 of 400 threshold pairs, 80 of 500 own pairs
    expected = 0.4 * (0.6 / (0.4 * 400) + 0.84 / (0.16 * 500)) ** 0.5
    assert statistics["noise_estimate_se"].item() == pytest.approx(expected, rel=1e-5)
    assert estimate(1e6)["noise_estimate"].item() == pytest.approx(0.48, abs=1e-6)  # the median: no tail to cut into


def test_the_calibrated_threshold_never_drops_below_the_margin():
    """Early in training the teacher cannot tell the planted pairs yet: their gaps (0.2, 0.3, 0.4, 0.5) are no
    larger than the clean pairs' (0.25). Their 20th percentile (0.2) would flag every pair, so D's cut-off stays at
    the margin (1) and D stays empty; the estimate reads the planted median (0.3), past which no own pair lies."""
    rule = memory_rule(quantile=0.2, min_sightings=2, margin=1.0)
    gaps = [0.25] * 16 + [0.2, 0.3, 0.4, 0.5]
    planted = [False] * 16 + [True] * 4
    for step in range(3):
        chosen = rule(gap_query(gaps, list(range(20)), step=step, alpha=0.9, planted=planted)).chosen
    assert rule.threshold.item() == pytest.approx(1.0) and not chosen.any()
    statistics = rule.epoch_statistics()
    assert statistics["flagged_share"].item() == 0.0 and statistics["noise_estimate"].item() == 0.0


def test_alpha_caps_the_memory_rule_s_subset_most_suspect_first():
    rule = memory_rule(min_sightings=1, margin=1.0)
    gaps = [2.0, 5.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]
    chosen = rule(gap_query(gaps, list(range(8)), step=0, alpha=2 / 8)).chosen
    assert torch.nonzero(chosen).flatten().tolist() == [1, 3]


def test_a_remembered_pair_s_weight_rises_over_the_ramp_past_the_threshold():
    """Threshold 1, ramp 2: remembered gaps 1.5, 2, 3 and 5 give weights 0.25, 0.5, 1, 1; a pair at 0.5 is not in D;
    a pair still on the fallback (seen too few times) keeps the fallback's weight (1, no ramp there)."""
    rule = memory_rule(min_sightings=2, margin=1.0, fallback_start=0, ramp=2.0)
    gaps = [1.5, 2.0, 3.0, 5.0, 0.5]
    rule(gap_query(gaps, [0, 1, 2, 3, 4], step=0, alpha=0.9))
    subset = rule(gap_query([*gaps, 3.0], [0, 1, 2, 3, 4, 5], step=1, alpha=0.9))
    assert subset.chosen.tolist() == [True, True, True, True, False, True]
    torch.testing.assert_close(subset.weight, torch.tensor([0.25, 0.5, 1.0, 1.0, 0.0, 1.0]))


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"ramp": -1.0}, "memory ramp must be >= 0, got -1.0"),
        ({"min_sightings": 0}, "min_sightings must be >= 1"),
        ({"quantile": 1.5}, "quantile must be in"),
        ({"quantile": 0.2, "threshold_pairs": 0.0}, "needs threshold pairs"),
        ({"refresh_every": 0}, "refresh_every must be >= 1"),
        ({"threshold_pairs_cap": 0}, "threshold_pairs_cap must be >= 1"),
        ({"estimate_tail": 0.0}, "estimate_tail must be > 0"),
    ],
)
def test_memory_rule_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        memory_rule(**settings)


def test_the_memory_rule_needs_pair_identities():
    query = gap_query([1.0, 0.0], [0, 1], step=0)
    query.pair_ids = None
    with pytest.raises(ValueError, match="needs each pair's identity"):
        memory_rule()(query)


def listed_rule(tmp_path, rows: dict) -> ListedSubset:
    """The rule over an audit-like table written to ``tmp_path``."""
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "memory.csv", index=False)
    return ListedSubset(str(tmp_path / "memory.csv"))


def test_the_listed_rule_distils_the_flagged_pairs_of_the_list_from_the_first_step(tmp_path):
    # pairs 3, 42 and 5 are flagged, 7 is listed but not flagged, 99 is flagged but not in this batch
    rule = listed_rule(
        tmp_path,
        {
            "pair_id": [42, 7, 99, 3, 5],
            "remembered_gap": [6.0, 5.0, 4.0, 2.0, 3.0],
            "flagged": [True, False, True, True, True],
        },
    )
    image, text = planted_batch(n=6, corrupted=())
    pair_ids = torch.tensor([10, 3, 7, 42, 5, 11])
    subset = rule(query_of(image, text, 0.5, pair_ids=pair_ids))
    assert subset.chosen.tolist() == [False, True, False, True, True, False]
    assert torch.equal(subset.weight, subset.chosen.float())
    # the cap keeps the most suspect first: 42 (gap 6), then 5 (gap 3)
    capped = rule(query_of(image, text, 2 / 6, pair_ids=pair_ids)).chosen
    assert capped.tolist() == [False, False, False, True, True, False]


def test_the_listed_rule_reads_every_row_of_a_plain_list_and_checks_it_against_the_data(tmp_path):
    rule = listed_rule(tmp_path, {"pair_id": [4, 1]})
    image, text = planted_batch(n=4, corrupted=())
    assert rule(query_of(image, text, 1.0, pair_ids=torch.tensor([0, 1, 2, 3]))).chosen.tolist() == [0, 1, 0, 0]
    rule.fit_data(5)  # pairs 0-4: the list fits
    with pytest.raises(ValueError, match="lists pair 4, but the data holds 4 pairs"):
        rule.fit_data(4)
    rule.fit_data(None)  # hashed identities: nothing to check
    query = query_of(image, text, 1.0)
    with pytest.raises(ValueError, match="needs each pair's identity"):
        rule(query)
    nothing_flagged = listed_rule(tmp_path, {"pair_id": [1], "flagged": [False]})
    assert not nothing_flagged(query_of(image, text, 1.0, pair_ids=torch.tensor([0, 1, 2, 3]))).chosen.any()


def test_the_listed_rule_names_what_its_list_lacks(tmp_path):
    with pytest.raises(ValueError, match=r"loss.subset.keys=.*memory.csv needs the columns \['pair_id'\]"):
        listed_rule(tmp_path, {"shard": ["a.tar"], "key": ["000001"]})
    with pytest.raises(ValueError, match="pair_id holds str values, not whole numbers"):
        listed_rule(tmp_path, {"pair_id": ["7", "x"]})
    with pytest.raises(FileNotFoundError, match="loss.subset.keys=nowhere.csv: no such file"):
        ListedSubset("nowhere.csv")
