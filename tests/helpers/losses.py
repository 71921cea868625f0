"""Builders shared by the loss and subset-rule tests: PSD losses with explicit settings, tiny feature batches."""

import functools

import torch
import torch.nn.functional as F

from psdclip.loss import PSDLoss
from psdclip.memory import PairMemory
from psdclip.subsets import DoubtSubset, MemorySubset, OutscoredSubset, RandomSubset
from psdclip.teacher import EMATeacher


def make_loss(subset=None, alpha_max=0.5, schedule="constant", ramp_start=0, ramp_end=None, **settings) -> PSDLoss:
    """A PSD loss with the given rule (default: a random D from seed 0) and settings (scope, tau_teacher, mix,
    local_loss), every other setting at its plain value."""
    options = {"scope": "batch", "tau_teacher": 1.0, "mix": 1.0, "local_loss": False, **settings}
    return PSDLoss(subset or RandomSubset(seed=0), alpha_max, schedule, ramp_start, ramp_end, **options)


def random_rule(seed=0):
    return RandomSubset(seed=seed)


def doubt_rule():
    return DoubtSubset()


def outscored_rule(margin=2.0, ramp=0.0):
    return OutscoredSubset(margin=margin, ramp=ramp)


def features(n=8, dim=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=-1)
    return image, text


def logits_of(image, text, scale=10.0):
    per_image = scale * image @ text.T
    return per_image, per_image.T


def planted_batch(n=16, corrupted=(2, 5, 11), dim=32, seed=0):
    """Aligned pairs (text ≈ image) except the planted ones, whose text belongs to no image in the batch."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    text = image + 0.1 * torch.randn(n, dim, generator=g)
    text[list(corrupted)] = torch.randn(len(corrupted), dim, generator=g)
    return image, F.normalize(text, dim=-1)


# the default rule with the EMA teacher at a constant alpha: D = the pairs (at most half the batch) whose best
# candidate the teacher scores above their own partner by more than the margin (0.5: a random teacher leaves some
# out), so the teacher's targets and D matter from the first step
EMA_OUTSCORED = {
    "alpha_max": 0.5,
    "schedule": "constant",
    "subset": "outscored",
    "outscore_margin": 0.5,
    "teacher": "ema",
    "ema_decay": 0.9,
    "scope": "batch",
}


def from_settings(
    subset="outscored",
    teacher="ema",
    ema_decay=0.99,
    ema_bias_correction=True,
    outscore_margin=2.0,
    outscore_ramp=0.0,
    seed=0,
    alpha_max=0.5,
    schedule="linear",
    ramp_start=0,
    ramp_end=None,
    **settings,
):
    """A loss and teacher factory from one flat set of settings, as the configs spell them (``loss/subset``
    name, ``teacher`` ema|self, ``teacher.decay``, ``teacher.bias_correction``): the module tests' shorthand."""
    rule = {
        "random": lambda: RandomSubset(seed=seed),
        "doubt": DoubtSubset,
        "outscored": lambda: OutscoredSubset(margin=outscore_margin, ramp=outscore_ramp),
        # decided by the memory from the first sighting, with the fixed margin (what a one-step test can see)
        "memory": lambda: memory_rule(
            min_sightings=1, margin=outscore_margin, fallback_start=0, fallback=(outscore_margin, outscore_ramp)
        ),
    }[subset]()
    loss = make_loss(rule, alpha_max, schedule, ramp_start, ramp_end, **settings)
    if teacher == "self":
        return loss, None
    return loss, functools.partial(EMATeacher, decay=ema_decay, bias_correction=ema_bias_correction, compile=False)


def memory_rule(
    slots=64, min_sightings=3, quantile=None, margin=1.0, decay=0.5, fallback_start=0.5, fallback=(2.0, 0.0), **settings
):
    """The memory rule with the given settings (a binomial range: overdispersion 1); defaults a few-step test can see."""
    return MemorySubset(
        PairMemory(decay=decay, slots=slots),
        OutscoredSubset(*fallback),
        min_sightings=min_sightings,
        quantile=quantile,
        margin=margin,
        fallback_start=fallback_start,
        refresh_every=settings.pop("refresh_every", 1),
        threshold_pairs=settings.pop("threshold_pairs", 0.03 if quantile else 0.0),
        threshold_pairs_cap=settings.pop("threshold_pairs_cap", None),
        ramp=settings.pop("ramp", 0.0),
        estimate_tail=settings.pop("estimate_tail", 8.0),
        clean_quantile=settings.pop("clean_quantile", 0.25),
        estimate_overdispersion=settings.pop("estimate_overdispersion", 1.0),
    )
