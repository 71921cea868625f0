import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from psdclip.loss import QUALITY_COUNTS, quality_counts, targets
from psdclip.subsets import Subset
from tests.helpers.losses import doubt_rule, features, logits_of, make_loss, planted_batch, random_rule

# the abstract's rule (loss=psd_random teacher=self): a random D, soft targets over D
RANDOM = {"scope": "subset"}


def random_mask(n, alpha, step, seed=0):
    """The random rule's D, drawn as the rule documents it: the first floor(alpha·n) of a seeded permutation."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[
        torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + step))[: math.floor(alpha * n)]
    ] = 1
    return mask


@pytest.mark.parametrize("n", [1, 7, 64])
def test_alpha_zero_equals_open_clip(n):
    image, text = features(n)
    scale = torch.tensor(14.3)
    expected = ClipLoss()(image, text, scale)
    out = make_loss(alpha_max=0.0)(image, text, scale, 3, 10)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out.stats["distill_count"] == 0 and torch.isnan(out.stats["loss_soft"])


def test_clip_config_equals_open_clip_at_any_step():
    image, text = features(32)
    loss = make_loss(alpha_max=0.0)
    for step in (0, 50, 99):
        out = loss(image, text, torch.tensor(10.0), step, 100)
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
    loss = make_loss(random_rule(seed=3), alpha_max=0.9, scope=scope, tau_teacher=tau, mix=mix)
    teacher_logits, teacher_per_image = None, per_image
    if teacher == "ema":
        t_image, t_text = features(n, seed=5, dtype=torch.float64)
        teacher_per_image = 12.0 * t_image @ t_text.T
        teacher_logits = (teacher_per_image, teacher_per_image.T)
    out = loss.from_logits(per_image, per_text, torch.arange(n), step, 20, teacher_logits, alpha=alpha)
    distilled = random_mask(n, alpha, step, seed=3)
    assert out.stats["distill_count"] == math.floor(alpha * n) == 4
    assert torch.equal(out.subset.chosen, distilled)
    expected = reference_psd(per_image, teacher_per_image, distilled, scope, tau, mix)
    assert torch.allclose(out.loss, expected, atol=1e-10)


def test_hard_and_soft_parts_partition_the_loss():
    n = 20
    per_image, per_text = logits_of(*features(n))
    out = make_loss(**RANDOM).from_logits(per_image, per_text, torch.arange(n), 0, 10, alpha=0.5)
    k = int(out.stats["distill_count"])
    assert k == 10
    assert torch.allclose(out.loss, (k * out.stats["loss_soft"] + (n - k) * out.stats["loss_hard"]) / n, atol=1e-6)
    assert 0 < out.stats["soft_target_diagonal"] < 1
    assert 0 < out.stats["soft_target_entropy"] <= math.log(k) + 1e-6


def test_soft_target_statistics_on_a_perfect_teacher():
    """A teacher sure of every given pair puts all its mass on the diagonal, with zero entropy."""
    n = 12
    per_image = torch.eye(n) * 50.0
    out = make_loss(alpha_max=0.9, **RANDOM).from_logits(per_image, per_image.T, torch.arange(n), 0, 10, alpha=0.5)
    assert torch.isclose(out.stats["soft_target_diagonal"], torch.tensor(1.0))
    assert out.stats["soft_target_entropy"] < 1e-6


def test_subset_scope_puts_no_mass_outside_the_subset():
    n = 9
    per_image, _ = logits_of(*features(n))
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[[1, 4, 6]] = True
    target, _ = targets(per_image, torch.arange(n), Subset(chosen, chosen.float()), "subset", 1.0)
    q = torch.softmax(per_image[[1, 4, 6]][:, [1, 4, 6]], dim=1)
    torch.testing.assert_close(target[[1, 4, 6]][:, [1, 4, 6]], q)
    assert target[[1, 4, 6]][:, ~chosen].abs().max() == 0
    assert torch.equal(target[~chosen], F.one_hot(torch.arange(n), n)[~chosen].float())


def test_local_rows_give_the_same_loss_as_the_whole_batch():
    """Rows split across two 'ranks' (local loss) add up to the single-process loss."""
    n = 16
    per_image, per_text = logits_of(*features(n))
    loss = make_loss(alpha_max=0.9, **RANDOM)
    whole = loss.from_logits(per_image, per_text, torch.arange(n), 11, 20, alpha=0.5).loss
    halves = [
        loss.from_logits(per_image[r], per_text[r], torch.arange(n)[r], 11, 20, alpha=0.5).loss
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
    loss = make_loss(alpha_max=0.9, scope=scope, tau_teacher=tau, mix=mix)
    t_image, t_text = features(n, dim, seed=9, dtype=torch.float64)
    teacher_logits = (8 * t_image @ t_text.T, 8 * t_text @ t_image.T)

    def fn(image, text, scale):
        per_image = scale * image @ text.T
        return loss.from_logits(per_image, per_image.T, torch.arange(n), 2, 10, teacher_logits, alpha=0.5).loss

    assert torch.autograd.gradcheck(fn, (image, text, scale))


def test_self_teacher_is_detached():
    """With the self teacher, soft targets are constants: the gradient equals CE against fixed targets."""
    n = 6
    image, text = features(n, dtype=torch.float64)
    logits = (5 * image @ text.T).requires_grad_(True)
    loss = make_loss(random_rule(seed=1), alpha_max=0.9, **RANDOM)
    loss.from_logits(logits, logits.T, torch.arange(n), 0, 10, alpha=0.5).loss.backward()
    frozen = logits.detach().clone().requires_grad_(True)
    fixed = (logits.detach(), logits.detach().T)
    loss.from_logits(frozen, frozen.T, torch.arange(n), 0, 10, teacher_logits=fixed, alpha=0.5).loss.backward()
    assert torch.allclose(logits.grad, frozen.grad)


def test_the_schedule_sets_alpha_and_the_count():
    """Without an explicit alpha the loss asks its schedule: D holds floor(alpha(step)·N) pairs."""
    per_image, per_text = logits_of(*features(40))
    loss = make_loss(alpha_max=0.5, schedule="linear", ramp_start=10, ramp_end=20)
    for step, count in ((5, 0), (10, 0), (15, 10), (20, 20), (30, 20)):
        out = loss.from_logits(per_image, per_text, torch.arange(40), step, 40)
        assert out.stats["distill_count"] == count
        assert out.stats["alpha"] == pytest.approx(loss.schedule(step, 40))


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"alpha_max": 1.0}, "alpha_max must be in \\[0, 1\\)"),
        ({"alpha_max": -0.1}, "alpha_max must be in \\[0, 1\\)"),
        ({"scope": "everything"}, "unknown scope"),
        ({"tau_teacher": 0.0}, "tau_teacher must be > 0"),
        ({"mix": 1.5}, "mix must be in"),
        ({"schedule": "step"}, "unknown alpha schedule"),
    ],
)
def test_refused_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        make_loss(**settings)


def test_a_random_subset_without_a_teacher_over_the_batch_is_refused():
    with pytest.raises(ValueError, match="no learning signal"):
        make_loss(scope="batch").check_teacher(has_teacher=False)
    make_loss(scope="batch").check_teacher(has_teacher=True)
    make_loss(scope="batch", tau_teacher=0.5).check_teacher(has_teacher=False)  # sharpening teaches
    make_loss(doubt_rule(), scope="batch").check_teacher(has_teacher=False)  # loss truncation is a rule


def test_quality_counts_equal_a_hand_count():
    chosen = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    marks = torch.tensor([1, 0, 1, 1, 0, 0, -1, 1], dtype=torch.int8)
    # marked pairs: 0..5 and 7; corrupted: 0, 2, 3, 7; D ∩ marked: 0, 1, 2; caught: 0, 2
    counts = dict(zip(QUALITY_COUNTS, quality_counts(chosen, marks).tolist()))
    assert counts == {"marked": 7, "corrupted": 4, "chosen_marked": 3, "caught": 2}
    assert quality_counts(chosen, None).tolist() == [0, 0, 0, 0]


def test_the_noise_marks_reach_the_quality_counts():
    image, text = planted_batch()
    marks = torch.zeros(16, dtype=torch.int8)
    marks[[2, 5, 11]] = 1
    out = make_loss(doubt_rule(), alpha_max=0.25, scope="subset")(
        image, text, torch.tensor(20.0), 0, 10, noise_marks=marks
    )
    assert dict(zip(QUALITY_COUNTS, out.quality.tolist())) == {
        "marked": 16,
        "corrupted": 3,
        "chosen_marked": 4,
        "caught": 3,
    }


@pytest.mark.parametrize("rule,settings", [(doubt_rule, {"scope": "batch", "mix": 0.7}), (random_rule, RANDOM)])
def test_the_targets_returned_are_the_ones_the_loss_used(rule, settings):
    n = 12
    image, text = features(n, dtype=torch.float64)
    t_image, t_text = features(n, seed=4, dtype=torch.float64)
    loss = make_loss(rule(), **settings)
    teacher = {"image_features": t_image, "text_features": t_text, "logit_scale": torch.tensor(12.0)}
    out = loss(image, text, torch.tensor(10.0, dtype=torch.float64), 3, 10, teacher_features=teacher)
    chosen, used = out.subset.chosen, out.targets_per_image.double()
    assert chosen.sum() == 6 and torch.allclose(used.sum(dim=1), torch.ones(n, dtype=torch.float64))
    assert torch.equal(used[~chosen], F.one_hot(torch.arange(n), n)[~chosen].to(used.dtype))
    # the image→text half of the loss, by hand from the returned targets
    by_hand = -(used * out.logits_per_image.log_softmax(dim=1)).sum(dim=1).mean()
    text_half = 2 * out.loss - by_hand
    per_text = out.logits_per_image.T
    text_targets = targets(12.0 * t_text @ t_image.T, torch.arange(n), out.subset, loss.scope, loss.mix)[0]
    torch.testing.assert_close(text_half, -(text_targets.double() * per_text.log_softmax(dim=1)).sum(dim=1).mean())
