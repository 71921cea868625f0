"""Rules that choose the distillation subset D of a global batch: which pairs trade their one-hot target for the
teacher's soft alignment, and with which weight.

Each rule is a small ``nn.Module`` that owns its own settings (and state, such as the pair memory) and answers one
question from the step's evidence (``SubsetQuery``): D as a bool mask over the global batch and each pair's
soft-target weight in [0, 1] (0 outside D). D never holds more than ``query.count`` = floor(alpha·N) pairs: alpha,
from the loss's schedule, caps D's share. A new rule is one class here plus one file in ``conf/loss/subset/``.

Rules work on the device without host syncs (no ``.item()``, no boolean-mask shapes), so the loss compiles with
``fullgraph=True``; only ``random`` draws on the host.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from psdclip.distributed import gather
from psdclip.memory import PairMemory
from psdclip.run.tables import read_flagged
from psdclip.schedule import step_of


@dataclass
class SubsetQuery:
    """What a rule sees of one step. Logits are the teacher's (the student's own, detached, without a teacher),
    already divided by the loss's ``tau_teacher``; rows are this rank's queries against all N pairs."""

    teacher_image: Tensor  # (rows, N) image→text
    teacher_text: Tensor  # (rows, N) text→image
    labels: Tensor  # (rows,) each row's own pair among the N
    count: Tensor  # () int64, the most pairs D may hold: floor(alpha·N)
    step: int | Tensor  # the optimiser step
    total_steps: int  # of the whole training
    pair_ids: Tensor | None = None  # (N,) int64 identity of each pair (``psdclip.data``), when the data gives it
    planted: Tensor | None = None  # (N,) bool, pairs given another pair's caption on purpose (threshold pairs)

    @property
    def batch_size(self) -> int:
        return self.teacher_image.shape[1]


@dataclass
class Subset:
    """A rule's answer: D over the global batch, the same on every rank, and each pair's soft-target weight."""

    chosen: Tensor  # (N,) bool
    weight: Tensor  # (N,) float in [0, 1], 0 outside D


def partner_probability(logits_per_image: Tensor, logits_per_text: Tensor, labels: Tensor) -> Tensor:
    """Each row's probability on its own partner, averaged over both directions: (rows,)."""
    rows = torch.arange(len(labels), device=labels.device)
    image = logits_per_image.detach().float().log_softmax(dim=-1)[rows, labels]
    text = logits_per_text.detach().float().log_softmax(dim=-1)[rows, labels]
    return (image.exp() + text.exp()) / 2


def partner_gap(logits_per_image: Tensor, logits_per_text: Tensor, labels: Tensor) -> Tensor:
    """How far each row's best candidate outscores its own partner, in logits, averaged over both directions:
    (rows,), ≥ 0; 0 when the partner is the best candidate both ways."""
    rows = torch.arange(len(labels), device=labels.device)
    gaps = [
        logits.detach().float().max(dim=-1).values - logits.detach().float()[rows, labels]
        for logits in (logits_per_image, logits_per_text)
    ]
    return (gaps[0] + gaps[1]) / 2


def over_batch(score: Tensor, batch_size: int) -> Tensor:
    """Per-row scores of this rank as scores of the whole global batch (each rank scores its own rows with the
    local loss, all N without it, when the gather is the identity)."""
    return gather(score, grad=False) if len(score) < batch_size else score


def lowest(values: Tensor, count: Tensor | int) -> Tensor:
    """Bool mask of the ``count`` entries with the lowest value (ties go to the lower index), with no host sync."""
    order = torch.argsort(values, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(values), device=values.device)
    return position < count


def largest(values: Tensor, count: Tensor | int) -> Tensor:
    """Bool mask of the ``count`` entries with the largest value (ties go to the lower index)."""
    return lowest(-values, count)


def hard_weight(chosen: Tensor) -> Subset:
    """Every pair of D fully distilled."""
    return Subset(chosen, chosen.float())


def ramped_weight(gap: Tensor, cut: Tensor | float, ramp: float, chosen: Tensor) -> Tensor:
    """Each chosen pair's soft-target weight, rising linearly from 0 at ``cut`` to 1 at ``cut + ramp`` logits of
    gap (1 at once when ``ramp`` is 0); 0 outside D."""
    if not ramp:
        return chosen.float()
    return ((gap - cut) / ramp).clamp(0.0, 1.0) * chosen


class SubsetRule(nn.Module):
    """Base of the rules: ``forward(query) -> Subset``; ``fit_data`` sizes per-pair state by the data before training
    (and before a checkpoint restores it); ``epoch_statistics`` what the rule learnt about the data (logged once per
    epoch). The last two do nothing by default."""

    name: str  # the rule's file in conf/loss/subset/ and its key in RULES

    def forward(self, query: SubsetQuery) -> Subset:
        raise NotImplementedError

    def score(self, query: SubsetQuery) -> Tensor:
        """How suspect each pair of the global batch looks to the rule from this batch alone, higher = more (what
        the audit ranks by): (N,)."""
        raise ValueError(f"subset rule {self.name!r} has no doubt score; use outscored, doubt or memory")

    def fit_data(self, pair_space: int | None) -> None:
        """``pair_space``: how many pairs the data holds where their identities are dense indices, else None."""

    def epoch_statistics(self) -> dict[str, Tensor]:
        return {}


class RandomSubset(SubsetRule):
    """floor(alpha·N) pairs drawn without replacement from ``seed`` and the step: the literal reading of the paper's
    abstract, reproducible and the same on every rank. Drawn on the host (no compiled graph)."""

    name = "random"

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def forward(self, query: SubsetQuery) -> Subset:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(query.step))
        drawn = torch.randperm(query.batch_size, generator=generator)[: int(query.count)]
        chosen = torch.zeros(query.batch_size, dtype=torch.bool).index_fill_(0, drawn, True)
        return hard_weight(chosen.to(query.labels.device))


class DoubtSubset(SubsetRule):
    """The floor(alpha·N) pairs with the lowest teacher probability on their own partner (a fixed count: in a clean
    batch it fills its quota with hard clean pairs)."""

    name = "doubt"

    def forward(self, query: SubsetQuery) -> Subset:
        return hard_weight(largest(self.score(query), query.count))

    def score(self, query: SubsetQuery) -> Tensor:
        probability = partner_probability(query.teacher_image, query.teacher_text, query.labels)
        return 1 - over_batch(probability, query.batch_size)


class OutscoredSubset(SubsetRule):
    """Of the pairs whose best candidate the teacher scores more than ``margin`` logits above the pair itself
    (averaged over both directions), the at most floor(alpha·N) with the largest gap.

    A wrong caption is one the teacher confidently places elsewhere; a clean pair that is merely hard has no
    confident alternative, keeps its target and is learnt.

    Args:
        margin: the gap in logits (a log-odds ratio: e² ≈ 7× at 2) that makes a pair suspect.
        ramp: the gap beyond the margin over which a pair's soft-target weight rises linearly from 0 to 1: a pair
            barely past the margin keeps most of its one-hot target. 0: full weight at once.
    """

    name = "outscored"

    def __init__(self, margin: float, ramp: float):
        super().__init__()
        if margin < 0:
            raise ValueError(f"outscored margin must be >= 0, got {margin}")
        if ramp < 0:
            raise ValueError(f"outscored ramp must be >= 0, got {ramp}")
        self.margin, self.ramp = margin, ramp

    def forward(self, query: SubsetQuery) -> Subset:
        return self.past_margin(self.score(query), query.count)

    def score(self, query: SubsetQuery) -> Tensor:
        return over_batch(partner_gap(query.teacher_image, query.teacher_text, query.labels), query.batch_size)

    def past_margin(self, gap: Tensor, count: Tensor | int) -> Subset:
        """D from per-pair gaps of the global batch: the largest first, so this keeps min(count, pairs past the
        margin) of them."""
        chosen = largest(gap, count) & (gap > self.margin)
        return Subset(chosen, ramped_weight(gap, self.margin, self.ramp, chosen))


class MemorySubset(SubsetRule):
    """D from evidence gathered over every appearance of each pair (``PairMemory``), not from one batch.

    A wrong caption is misplaced by the teacher again and again, from the first epochs on; a hard clean pair now
    and then. Every step records each pair's gap (the ``outscored`` score); a pair seen at least ``min_sightings``
    times is in D when its remembered gap exceeds the threshold. The threshold calibrates itself where the data
    plants threshold pairs (``data.threshold_pairs``: pairs given another pair's caption on purpose, AUM's idea):
    the ``quantile`` of their remembered gaps, so that ~(1 − quantile) of known-wrong pairs would be caught, but
    never below ``margin``: early in training the teacher cannot yet tell the planted pairs from the rest, their
    quantile sits near 0, and a cut-off there would fill D with clean pairs. A pair seen fewer times falls back to
    the single-batch ``outscored`` rule (``fallback``), which opens at ``fallback_start``: a one-pass run behaves as
    today's rule.

    A remembered pair's soft-target weight rises over ``ramp`` logits past the threshold: a clean pair flagged just
    past it keeps most of its one-hot target, so it is still learnt, its gap falls and it leaves D. Fully distilled,
    it would be pushed towards the teacher's wrong belief, keep its gap and stay in D (a self-confirming loop).

    Args:
        memory: the per-pair table.
        fallback: the single-batch rule for pairs with too few sightings.
        min_sightings: appearances before a pair's memory decides.
        quantile: of the threshold pairs' remembered gaps that sets the cut-off; null: ``margin`` always.
        threshold_pairs: the share of pairs the data plants as threshold pairs (the data module reads it from
            this rule's config; the rule only checks that a calibrated cut-off has some).
        threshold_pairs_cap: about how many threshold pairs at most (null: the share alone); read by the data
            module as the share is. Each costs what a wrong caption costs; the calibration needs a count, not a share.
        margin: the least remembered gap, in logits, that flags a pair: a floor under the calibrated cut-off, and the
            cut-off itself without threshold pairs.
        fallback_start: when the fallback rule starts taking pairs, a step (int) or a fraction of the training
            (float): today's rule opens half-way; the memory's pairs may enter D from the first step.
        refresh_every: steps between two calibrations of the threshold.
        ramp: the remembered gap past the threshold, in logits, over which a pair's weight rises from 0 to 1; 0: full
            weight at once.
        estimate_tail: sets the noise estimate's cut-off among the n threshold pairs: their max(1/2, 1 −
            estimate_tail/√n) quantile, so about estimate_tail·√n of them lie past it (``noise_estimate``).
        clean_quantile: the noise estimate's low region: the data's own pairs below this quantile of their remembered
            gaps, mostly clean, where threshold pairs whose donor caption fits their image show (``noise_estimate``).
        estimate_overdispersion: how much wider than binomial sampling the noise estimate's range is drawn
            (``noise_estimate``).
    """

    name = "memory"

    def __init__(
        self,
        memory: PairMemory,
        fallback: OutscoredSubset,
        min_sightings: int,
        quantile: float | None,
        margin: float,
        fallback_start: float,
        refresh_every: int,
        threshold_pairs: float,
        threshold_pairs_cap: int | None,
        ramp: float,
        estimate_tail: float,
        clean_quantile: float,
        estimate_overdispersion: float,
    ):
        super().__init__()
        if estimate_overdispersion < 1.0:
            raise ValueError(f"estimate_overdispersion must be >= 1, got {estimate_overdispersion}")
        if not 0.0 < clean_quantile < 1.0:
            raise ValueError(f"clean_quantile must be in (0, 1), got {clean_quantile}")
        if estimate_tail <= 0:
            raise ValueError(f"estimate_tail must be > 0, got {estimate_tail}")
        if ramp < 0:
            raise ValueError(f"memory ramp must be >= 0, got {ramp}")
        if threshold_pairs_cap is not None and threshold_pairs_cap < 1:
            raise ValueError(f"threshold_pairs_cap must be >= 1 or null, got {threshold_pairs_cap}")
        if quantile is not None and not threshold_pairs:
            raise ValueError(
                "a calibrated threshold (quantile) needs threshold pairs: set threshold_pairs > 0 or quantile=null"
            )
        if min_sightings < 1:
            raise ValueError(f"min_sightings must be >= 1, got {min_sightings}")
        if quantile is not None and not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1) or null, got {quantile}")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        self.memory, self.fallback = memory, fallback
        self.min_sightings, self.quantile, self.margin = min_sightings, quantile, margin
        self.fallback_start, self.refresh_every, self.ramp = fallback_start, refresh_every, ramp
        self.estimate_tail, self.clean_quantile = estimate_tail, clean_quantile
        self.estimate_overdispersion = estimate_overdispersion
        # the calibrated cut-off, refreshed every few steps (it sorts the table); in the checkpoint, so a resumed run
        # chooses the same D
        self.register_buffer("threshold", torch.tensor(float(margin)))

    def fit_data(self, pair_space: int | None) -> None:
        self.memory.fit_data(pair_space)

    def refresh_threshold(self) -> None:
        """The threshold pairs' ``quantile`` of remembered gaps, at least ``margin``; ``margin`` without any."""
        if self.quantile is not None:
            calibrated = self.memory.quantile_of(self.quantile, self.min_sightings)
            self.threshold.copy_(calibrated.nan_to_num(self.margin).clamp(min=self.margin))

    def forward(self, query: SubsetQuery) -> Subset:
        if query.pair_ids is None:
            raise ValueError("subset rule 'memory' needs each pair's identity: use a psdclip data module")
        gap = self.fallback.score(query)
        remembered, sightings = self.memory.record(query.pair_ids, gap, query.planted)
        if query.step % self.refresh_every == 0:
            self.refresh_threshold()
        known = sightings >= self.min_sightings
        fallback = self.fallback.past_margin(gap, query.count)
        fallback_open = gap.new_full((), query.step) >= step_of(self.fallback_start, query.total_steps)
        flagged = torch.where(known, remembered > self.threshold, fallback.chosen & fallback_open)
        # the most suspect first when the cap binds: remembered gaps where known, the batch's gap otherwise
        chosen = largest(torch.where(flagged, torch.where(known, remembered, gap), -torch.inf), query.count) & flagged
        remembered_weight = ramped_weight(remembered, self.threshold, self.ramp, chosen)
        return Subset(chosen, torch.where(known, remembered_weight, fallback.weight * chosen))

    def epoch_statistics(self) -> dict[str, Tensor]:
        """``noise_estimate`` (± ``noise_estimate_se``) in ``noise_estimate_low`` … ``noise_estimate_high``: the share
        of wrong captions among the data's own pairs seen at least ``min_sightings`` times (``noise_estimate`` below).
        Its cut-off among the n threshold pairs: their 1 − ``estimate_tail``/√n quantile, never below their median (the
        median up to 256 of them, as in the study's ~45; 0.89 with 5,000), past which fewer clean pairs lie, and about
        ``estimate_tail``·√n of them. Without threshold pairs the estimate is the flagged share, uncalibrated.
        ``flagged_share``: the share past D's cut-off ``noise_threshold``. ``memory_collisions``: pairs that landed on
        a slot another pair held (hashed identities only)."""
        flagged = self.memory.share_above(self.threshold, self.min_sightings)
        statistics = {
            "flagged_share": flagged,
            "noise_threshold": self.threshold.clone(),
            "memory_collisions": self.memory.collisions.float(),
        }
        if self.quantile is None:
            return {**statistics, "noise_estimate": flagged}
        planted = self.memory.seen(self.min_sightings, planted=True).sum()
        own = self.memory.seen(self.min_sightings, planted=False).sum()
        quantile = (1 - self.estimate_tail / planted.clamp(min=1).sqrt()).clamp(min=0.5)
        cut = self.memory.quantile_of(quantile, self.min_sightings)
        low = self.memory.quantile_of(self.clean_quantile, self.min_sightings, planted=False)
        estimate = noise_estimate(
            own_past=self.memory.share_above(cut, self.min_sightings),
            planted_past=self.memory.share_above(cut, self.min_sightings, planted=True),
            own_low=1 - self.memory.share_above(low, self.min_sightings),
            planted_low=1 - self.memory.share_above(low, self.min_sightings, planted=True),
            own=own,
            planted=planted,
            overdispersion=self.estimate_overdispersion,
        )
        return {**statistics, **estimate}


def noise_estimate(
    own_past: Tensor,
    planted_past: Tensor,
    own_low: Tensor,
    planted_low: Tensor,
    own: Tensor,
    planted: Tensor,
    overdispersion: float = 1.0,
) -> dict[str, Tensor]:
    """The share of wrong captions in the data as a range that says what the memory knows, and the range's middle.

    The data's own pairs are a mixture, F = (1 − π)·C + π·W, of clean (C) and wrong (W) pairs, and the threshold pairs
    should be W. Past the cut-off (``*_past``: the high gaps) the ratio a = F/G estimates π, but reads high: clean pairs
    still past it look wrong, and a share ρ of the threshold pairs got a donor caption that fits their image (a class
    name on class-template captions, a near-duplicate caption on the web), so G = ρ·C + (1 − ρ)·W and a ≈ π/(1 − ρ).
    At the low gaps (``*_low``: below the data's ``clean_quantile``) b = G/F measures those fitting donors, ρ/(1 − π),
    where wrong captions are rare there, and a(1 − b)/(1 − ab) = π removes them (the mutual-contamination model of
    label noise: Scott, Blanchard & Handy, 2013). That correction reads low where the model has memorised wrong
    captions down to the low gaps (they look like fitting donors; most at 60% noise), and gaps alone cannot tell the
    two apart. So the two readings bound π from above and below, each widened by ±1.96 of its relative error:
    binomial (of the ``planted`` threshold pairs past the cut-off, and of the ``own`` pairs past it) times
    ``overdispersion``, how much more the threshold pairs' share varies than binomial sampling says (a few dozen of them
    hold an uneven mix of the data's kinds of pairs): ``noise_estimate_low`` … ``noise_estimate_high``.
    ``noise_estimate`` is the range's middle, ``noise_estimate_se`` its standard error. Where a·b ≥ 1 (the low gaps hold a larger share of threshold pairs than of the data: no mixture explains
    it) the correction is left out."""
    ratio = own_past / planted_past
    low_ratio = planted_low / own_low
    mixture = 1 - ratio * low_ratio > 0
    corrected = torch.where(mixture, ratio * (1 - low_ratio) / torch.where(mixture, 1 - ratio * low_ratio, 1.0), ratio)
    upper, lower = ratio.clamp(0.0, 1.0), corrected.clamp(0.0, 1.0)
    binomial = (1 - planted_past) / (planted_past * planted) + (1 - own_past) / (own_past * own).clamp(min=1e-12)
    relative = overdispersion * binomial.sqrt()
    estimate = (upper + lower) / 2
    return {
        "noise_estimate": estimate,
        "noise_estimate_se": estimate * relative,
        "noise_estimate_low": (lower * (1 - 1.96 * relative)).clamp(min=0.0),
        "noise_estimate_high": (upper * (1 + 1.96 * relative)).clamp(max=1.0),
    }


class ListedSubset(SubsetRule):
    """D = the pairs a list names, known from the first step: the pairs an earlier run's memory flagged (the audit's
    ``memory.csv``), for a second training on the same data.

    A run learns from a wrong caption from its first steps, before its own evidence can flag it; a retraining that is
    given the list distils those pairs before anything is memorised. Each listed pair of a batch is fully distilled,
    at most floor(alpha·N) of them, the most suspect first (the list's ``remembered_gap`` where it has one).

    Args:
        keys: a CSV with a ``pair_id`` column (the audit's ``memory.csv``): its flagged rows where it has a
            ``flagged`` column, else every row. The identities are the data's (``psdclip.data``): list pairs from an
            audit of the same shards.
    """

    name = "listed"

    def __init__(self, keys: str):
        super().__init__()
        table = read_flagged(keys, "loss.subset.keys", ["pair_id"]).sort_values("pair_id")
        if table["pair_id"].dtype.kind not in "iu":
            raise ValueError(
                f"loss.subset.keys={keys}: pair_id holds {table['pair_id'].dtype} values, not whole numbers"
            )
        listed = torch.tensor(table["pair_id"].to_numpy(), dtype=torch.int64)
        scores = torch.zeros(len(listed))
        if "remembered_gap" in table.columns:
            scores = torch.tensor(table["remembered_gap"].fillna(0.0).to_numpy(), dtype=torch.float32)
        self.keys = keys
        # from the list, not learnt: left out of the checkpoint, so a resumed run reads the list again
        self.register_buffer("listed", listed, persistent=False)
        self.register_buffer("listed_scores", scores, persistent=False)

    def fit_data(self, pair_space: int | None) -> None:
        if pair_space is not None and len(self.listed) and int(self.listed[-1]) >= pair_space:
            raise ValueError(
                f"loss.subset.keys={self.keys} lists pair {int(self.listed[-1])}, but the data holds {pair_space} "
                "pairs: list the pairs of an audit of these shards"
            )

    def forward(self, query: SubsetQuery) -> Subset:
        if query.pair_ids is None:
            raise ValueError("subset rule 'listed' needs each pair's identity: use a psdclip data module")
        if not len(self.listed):
            return hard_weight(torch.zeros(query.batch_size, dtype=torch.bool, device=query.labels.device))
        place = torch.searchsorted(self.listed, query.pair_ids).clamp(max=len(self.listed) - 1)
        listed = self.listed[place] == query.pair_ids
        score = torch.where(listed, self.listed_scores[place], -torch.inf)
        return hard_weight(largest(score, query.count) & listed)


# the registry: each rule by the name of its config (conf/loss/subset/<name>.yaml)
RULES = {rule.name: rule for rule in (RandomSubset, DoubtSubset, OutscoredSubset, MemorySubset, ListedSubset)}
