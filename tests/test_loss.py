import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from psdclip.loss import PSDLoss, direction_loss

# the rule these tests were written for: a random D, the self teacher, soft targets over D (loss=psd_random)
RANDOM = {"subset": "random", "teacher": "self", "scope": "subset"}


def features(n=8, dim=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=-1)
    return image, text


def logits_of(image, text, scale=10.0):
    per_image = scale * image @ text.T
    return per_image, per_image.T


@pytest.mark.parametrize("n", [1, 7, 64])
def test_alpha_zero_equals_open_clip(n):
    image, text = features(n)
    scale = torch.tensor(14.3)
    expected = ClipLoss()(image, text, scale)
    per_image, per_text = logits_of(image, text, scale)
    out = PSDLoss(alpha_max=0.0).from_logits(per_image, per_text, torch.arange(n), alpha=0.0, step=3)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out.stats["distill_count"] == 0 and "loss_soft" not in out.stats


def test_clip_config_equals_open_clip_at_any_step():
    image, text = features(32)
    loss = PSDLoss(alpha_max=0.0, schedule="constant")
    per_image, per_text = logits_of(image, text)
    for step in (0, 50, 99):
        out = loss.from_logits(per_image, per_text, torch.arange(32), loss.schedule(step, 100), step)
        assert torch.allclose(out.loss, ClipLoss()(image, text, torch.tensor(10.0)), atol=1e-6)


def reference_psd(per_image, teacher, distilled, scope, tau, mix):
    """Hand computation of the PSD loss, one row and one column at a time."""
    n = per_image.shape[0]
    members = [i for i in range(n) if distilled[i]]

    def target(row_teacher, own):
        y = torch.zeros(n, dtype=per_image.dtype)
        if own not in members:
            y[own] = 1.0
            return y
        allowed = members if scope == "subset" else list(range(n))
        q = torch.softmax(row_teacher[allowed] / tau, dim=0)
        y[allowed] = mix * q
        y[own] += 1 - mix
        return y

    image_rows = [-(target(teacher[i], i) * torch.log_softmax(per_image[i], 0)).sum() for i in range(n)]
    text_cols = [-(target(teacher[:, j], j) * torch.log_softmax(per_image[:, j], 0)).sum() for j in range(n)]
    return 0.5 * (torch.stack(image_rows).mean() + torch.stack(text_cols).mean())


@pytest.mark.parametrize(
    "scope,tau,mix,teacher",
    [
        ("subset", 1.0, 1.0, "self"),
        ("subset", 0.5, 0.7, "self"),
        ("batch", 0.5, 1.0, "self"),
        ("batch", 1.0, 0.6, "ema"),
    ],
)
def test_matches_hand_computation(scope, tau, mix, teacher):
    n, alpha, step = 10, 0.45, 7
    image, text = features(n, dtype=torch.float64)
    per_image, per_text = logits_of(image, text)
    loss = PSDLoss(alpha_max=0.9, subset="random", teacher=teacher, scope=scope, tau_teacher=tau, mix=mix, seed=3)
    teacher_logits = None
    teacher_per_image = per_image
    if teacher == "ema":
        t_image, t_text = features(n, seed=5, dtype=torch.float64)
        teacher_per_image = 12.0 * t_image @ t_text.T
        teacher_logits = (teacher_per_image, teacher_per_image.T)
    out = loss.from_logits(per_image, per_text, torch.arange(n), alpha, step, teacher_logits)
    distilled = loss.distill_mask(n, alpha, step)
    assert out.stats["distill_count"] == math.floor(alpha * n) == 4
    expected = reference_psd(per_image, teacher_per_image, distilled, scope, tau, mix)
    assert torch.allclose(out.loss, expected, atol=1e-10)


def test_hard_and_soft_parts_partition_the_loss():
    n = 20
    image, text = features(n)
    per_image, per_text = logits_of(image, text)
    loss = PSDLoss(alpha_max=0.5, **RANDOM)
    out = loss.from_logits(per_image, per_text, torch.arange(n), 0.5, 0)
    k = int(out.stats["distill_count"])
    assert k == 10
    assert torch.allclose(out.loss, (k * out.stats["loss_soft"] + (n - k) * out.stats["loss_hard"]) / n, atol=1e-6)
    assert 0 < out.stats["soft_target_diagonal"] < 1
    assert 0 < out.stats["soft_target_entropy"] <= math.log(k) + 1e-6


def test_soft_target_statistics_on_a_perfect_teacher():
    """A teacher sure of every given pair puts all its mass on the diagonal, with zero entropy."""
    n = 12
    per_image = torch.eye(n) * 50.0
    out = PSDLoss(alpha_max=0.9, **RANDOM).from_logits(per_image, per_image.T, torch.arange(n), 0.5, 0)
    assert torch.isclose(out.stats["soft_target_diagonal"], torch.tensor(1.0))
    assert out.stats["soft_target_entropy"] < 1e-6


def test_subset_scope_puts_no_mass_outside_the_subset():
    n = 9
    image, text = features(n)
    per_image, _ = logits_of(image, text)
    distill = torch.zeros(n, dtype=torch.bool)
    distill[[1, 4, 6]] = True
    result = direction_loss(per_image, per_image, torch.arange(n), distill, scope="subset")
    assert result.distilled.tolist() == distill.tolist()
    # Recompute the soft targets of the three rows: over columns {1, 4, 6} only.
    q = torch.softmax(per_image[[1, 4, 6]][:, [1, 4, 6]], dim=1)
    assert torch.allclose(result.diagonal, q.diagonal(), atol=1e-6)


def test_local_rows_give_the_same_loss_as_the_whole_batch():
    """Rows split across two 'ranks' (local loss) add up to the single-process loss."""
    n = 16
    image, text = features(n)
    per_image, per_text = logits_of(image, text)
    loss = PSDLoss(alpha_max=0.9, **RANDOM)
    whole = loss.from_logits(per_image, per_text, torch.arange(n), 0.5, 11).loss
    halves = [
        loss.from_logits(per_image[r], per_text[r], torch.arange(n)[r], 0.5, 11).loss
        for r in (slice(0, 8), slice(8, 16))
    ]
    assert torch.allclose(whole, sum(halves) / 2, atol=1e-6)


@pytest.mark.parametrize("scope,tau,mix", [("subset", 1.0, 1.0), ("batch", 0.5, 1.0), ("subset", 0.7, 0.8)])
def test_gradcheck(scope, tau, mix):
    """Analytic gradients against finite differences, with the teacher's logits held fixed (targets are constants;
    the self teacher is the same call with the student's detached logits, see the next test)."""
    n, dim = 6, 4
    image, text = features(n, dim, dtype=torch.float64)
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    loss = PSDLoss(alpha_max=0.9, subset="random", scope=scope, tau_teacher=tau, teacher="ema", mix=mix)
    t_image, t_text = features(n, dim, seed=9, dtype=torch.float64)
    teacher_logits = (8 * t_image @ t_text.T, 8 * t_text @ t_image.T)

    def fn(image, text, scale):
        per_image = scale * image @ text.T
        return loss.from_logits(per_image, per_image.T, torch.arange(n), 0.5, 2, teacher_logits).loss

    assert torch.autograd.gradcheck(fn, (image, text, scale))


def test_self_teacher_is_detached():
    """With the self teacher, soft targets are constants: the gradient equals CE against fixed targets."""
    n = 6
    image, text = features(n, dtype=torch.float64)
    logits = (5 * image @ text.T).requires_grad_(True)
    loss = PSDLoss(alpha_max=0.9, seed=1, **RANDOM)
    loss.from_logits(logits, logits.T, torch.arange(n), 0.5, 0).loss.backward()
    frozen = logits.detach().clone().requires_grad_(True)
    loss.from_logits(
        frozen, frozen.T, torch.arange(n), 0.5, 0, teacher_logits=(logits.detach(), logits.detach().T)
    ).loss.backward()
    assert torch.allclose(logits.grad, frozen.grad)


def test_distill_mask_is_reproducible_and_varies_by_step():
    loss = PSDLoss(alpha_max=0.5, seed=4)
    first, again, later = (
        loss.distill_mask(100, 0.37, 5),
        loss.distill_mask(100, 0.37, 5),
        loss.distill_mask(100, 0.37, 6),
    )
    assert first.sum() == 37 and torch.equal(first, again) and not torch.equal(first, later)
    assert not torch.equal(first, PSDLoss(alpha_max=0.5, seed=5).distill_mask(100, 0.37, 5))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"alpha_max": 1.0}, "alpha_max must be in \\[0, 1\\)"),
        ({"alpha_max": -0.1}, "alpha_max must be in \\[0, 1\\)"),
        ({"subset": "random", "teacher": "self", "scope": "batch", "tau_teacher": 1.0}, "no learning signal"),
        ({"teacher": "oracle"}, "unknown teacher"),
        ({"scope": "everything"}, "unknown scope"),
        ({"tau_teacher": 0.0}, "tau_teacher must be > 0"),
        ({"mix": 1.5}, "mix must be in"),
        ({"schedule": "step"}, "unknown alpha schedule"),
    ],
)
def test_refused_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PSDLoss(**kwargs)


def test_self_teacher_sharpening_over_the_batch_is_allowed():
    PSDLoss(teacher="self", scope="batch", tau_teacher=0.5)
    PSDLoss(teacher="ema", scope="batch", tau_teacher=1.0)


def planted_batch(n=16, corrupted=(2, 5, 11), dim=32, seed=0):
    """Aligned pairs (text ≈ image) except the planted ones, whose text belongs to no image in the batch."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    text = image + 0.1 * torch.randn(n, dim, generator=g)
    text[list(corrupted)] = torch.randn(len(corrupted), dim, generator=g)
    return image, F.normalize(text, dim=-1)


@pytest.mark.parametrize("teacher", ["self", "ema"])
def test_doubt_picks_the_planted_corrupted_pairs(teacher):
    planted = (2, 5, 11)
    image, text = planted_batch(corrupted=planted)
    loss = PSDLoss(alpha_max=3 / 16, schedule="constant", subset="doubt", teacher=teacher)
    teacher_features = {"image_features": image, "text_features": text, "logit_scale": torch.tensor(20.0)}
    # the student is random: D follows the teacher (the student's own logits with the self teacher)
    student = features(16, 32) if teacher == "ema" else (image, text)
    out = loss(
        *student,
        torch.tensor(20.0),
        step=0,
        total_steps=10,
        teacher_features=teacher_features if teacher == "ema" else None,
    )
    assert torch.nonzero(out.distill).flatten().tolist() == list(planted)


def test_doubt_breaks_ties_towards_the_lower_index():
    from psdclip.loss import most_doubted

    assert most_doubted(torch.tensor([0.5, 0.1, 0.1, 0.9, 0.1]), 2).tolist() == [False, True, True, False, False]


def test_doubt_with_the_self_teacher_over_the_batch_truncates_the_doubted_pairs():
    """Soft target = the row's own prediction: doubted rows carry no gradient (loss truncation), the others are CLIP's."""
    image, text = planted_batch()
    logits = (20 * image @ text.T).requires_grad_(True)
    loss = PSDLoss(alpha_max=0.25, schedule="constant", subset="doubt", teacher="self", scope="batch")
    out = loss.from_logits(logits, logits.T, torch.arange(16), 0.25, 0)
    out.loss.backward()
    doubted = out.distill
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


def test_subset_precision_and_recall_equal_a_hand_count():
    from psdclip.loss import subset_quality

    distill = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    marks = torch.tensor([1, 0, 1, 1, 0, 0, -1, 1], dtype=torch.int8)
    # marked pairs: 0..5 and 7; corrupted: 0, 2, 3, 7; D ∩ marked: 0, 1, 2; caught: 0, 2
    stats = subset_quality(distill, marks)
    assert stats["batch_noise"].item() == pytest.approx(4 / 7)
    assert stats["distill_precision"].item() == pytest.approx(2 / 3)
    assert stats["distill_recall"].item() == pytest.approx(2 / 4)
    assert subset_quality(distill, torch.full((8,), -1, dtype=torch.int8)) == {}
    assert subset_quality(torch.zeros(8, dtype=torch.bool), marks)["distill_precision"] is None


def test_the_noise_marks_reach_the_logged_statistics():
    image, text = planted_batch()
    marks = torch.zeros(16, dtype=torch.int8)
    marks[[2, 5, 11]] = 1
    loss = PSDLoss(alpha_max=0.25, schedule="constant", subset="doubt", teacher="self", scope="subset")
    out = loss(image, text, torch.tensor(20.0), 0, 10, noise_marks=marks)
    assert out.stats["distill_precision"] == 0.75 and out.stats["distill_recall"] == 1.0
    assert out.stats["batch_noise"] == pytest.approx(3 / 16)


@pytest.mark.parametrize("rule", [{"subset": "doubt", "teacher": "ema", "scope": "batch", "mix": 0.7}, RANDOM])
def test_targets_are_the_ones_the_loss_used(rule):
    n = 12
    image, text = features(n, dtype=torch.float64)
    t_image, t_text = features(n, seed=4, dtype=torch.float64)
    loss = PSDLoss(alpha_max=0.5, schedule="constant", **rule)
    out = loss(
        image,
        text,
        torch.tensor(10.0, dtype=torch.float64),
        3,
        10,
        teacher_features={"image_features": t_image, "text_features": t_text, "logit_scale": torch.tensor(12.0)},
    )
    targets = loss.targets(out)
    assert out.distill.sum() == 6 and torch.allclose(targets.sum(dim=1), torch.ones(n, dtype=torch.float64))
    assert torch.equal(targets[~out.distill], F.one_hot(torch.arange(n), n)[~out.distill].to(targets.dtype))
    used = direction_loss(
        out.logits_per_image,
        out.teacher_logits_per_image,
        out.labels,
        out.distill,
        loss.scope,
        loss.tau_teacher,
        loss.mix,
    )
    by_hand = -(targets * out.logits_per_image.log_softmax(dim=1)).sum(dim=1)
    torch.testing.assert_close(by_hand, used.per_row)


def test_only_the_ema_teacher_of_a_distilling_loss_is_built():
    from psdclip.teacher import EMATeacher

    model = torch.nn.Linear(2, 2)
    assert isinstance(PSDLoss(teacher="ema", ema_decay=0.9).make_teacher(model), EMATeacher)
    assert PSDLoss(**RANDOM).make_teacher(model) is None
    assert PSDLoss(alpha_max=0.0, teacher="ema").make_teacher(model) is None  # plain CLIP never pays for a teacher


def test_unknown_subset_rule_is_refused():
    with pytest.raises(
        ValueError, match="unknown subset 'hardest'; choose one of \\(.random., .doubt., .outscored.\\)"
    ):
        PSDLoss(subset="hardest")


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
    from psdclip.loss import partner_gap

    logits = torch.tensor([[3.0, 5.0, 1.0], [2.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
    # image→text: best − own = 5 − 3, 4 − 4, 1 − 1; text→image (columns): 3 − 3, 5 − 4, 1 − 1; halved by tau = 0.5
    torch.testing.assert_close(partner_gap(logits, logits.T, torch.arange(3), tau=0.5), torch.tensor([2.0, 1.0, 0.0]))


def test_outscored_picks_the_wrong_caption_not_the_pairs_of_a_hard_concept():
    image, text = concept_batch()
    chosen = {}
    for subset in ("doubt", "outscored"):
        loss = PSDLoss(alpha_max=0.25, schedule="constant", subset=subset, teacher="self", outscore_margin=2.0)
        chosen[subset] = torch.nonzero(loss(image, text, torch.tensor(20.0), 0, 10).distill).flatten().tolist()
    # the fixed-count rule fills its quota of 4 with clean pairs of the hard concept 0 and of concept 3; only pair 9
    # has a candidate that outscores it by more than the margin
    assert chosen["doubt"] == [2, 3, 9, 15]
    assert chosen["outscored"] == [9]


def test_outscored_takes_at_most_alpha_n_pairs_largest_gap_first():
    image, text = planted_batch(corrupted=(2, 5, 11))
    loss = PSDLoss(alpha_max=2 / 16, schedule="constant", subset="outscored", teacher="self", outscore_margin=0.5)
    logits = 20 * image @ text.T
    from psdclip.loss import partner_gap

    gap = partner_gap(logits, logits.T, torch.arange(16))
    out = loss.from_logits(logits, logits.T, torch.arange(16), 2 / 16, 0)
    assert out.distill.sum() == 2 and set(torch.nonzero(out.distill).flatten().tolist()) <= {2, 5, 11}
    assert gap[out.distill].min() >= gap[~out.distill].max()


def test_negative_outscore_margin_is_refused():
    with pytest.raises(ValueError, match="outscore_margin must be >= 0, got -1"):
        PSDLoss(outscore_margin=-1)


def test_outscore_ramp_weights_each_pair_s_soft_target_by_its_gap_past_the_margin():
    # image k scores caption k+1 2k logits above its own caption (gap 2k image→text); the text→image gaps follow
    n, margin, ramp = 6, 1.0, 4.0
    logits = torch.zeros(n, n, dtype=torch.float64)
    for k in range(n):
        logits[k, (k + 1) % n] = 2.0 * k
    loss = PSDLoss(
        alpha_max=0.99,
        schedule="constant",
        subset="outscored",
        teacher="self",
        scope="batch",
        mix=0.8,
        outscore_margin=margin,
        outscore_ramp=ramp,
    )
    out = loss.from_logits(logits, logits.T.contiguous(), torch.arange(n), 0.99, 0)
    gap = torch.tensor([2.0 * k for k in range(n)], dtype=torch.float64)
    gap = (gap + torch.stack([logits[:, k].max() - logits[k, k] for k in range(n)])) / 2  # mean of the two directions
    expected = 0.8 * ((gap - margin) / ramp).clamp(0, 1) * (gap > margin)
    torch.testing.assert_close(out.mix, expected.to(out.mix.dtype))
    assert out.distill.tolist() == (gap > margin).tolist()
    # the targets the loss used: each distilled row mixes its own one-hot back in by 1 − its weight
    targets, soft = loss.targets(out), logits.softmax(dim=1)
    for row in range(n):
        one_hot = F.one_hot(torch.tensor(row), n).to(soft.dtype)
        torch.testing.assert_close(targets[row], expected[row] * soft[row] + (1 - expected[row]) * one_hot)


def test_negative_outscore_ramp_is_refused():
    with pytest.raises(ValueError, match="outscore_ramp must be >= 0, got -2"):
        PSDLoss(outscore_ramp=-2)
