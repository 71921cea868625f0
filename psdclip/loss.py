"""Progressive self-distillation (PSD) loss, a drop-in generalisation of open_clip's ClipLoss.

For a global batch of N pairs, a distillation subset D of at most floor(alpha * N) pairs trades its one-hot target for
the teacher's soft alignment; every other pair keeps the usual contrastive target. alpha ramps up over training. D is
drawn at random (the literal reading of the paper's abstract) or chosen from the teacher's doubt of each pair:
``outscored`` (the default) takes the pairs whose best candidate, in either direction, the teacher scores more than
``outscore_margin`` logits above the pair itself; ``doubt`` takes the lowest teacher probability on the own partner.
A wrong caption is one the teacher confidently places elsewhere, so D catches it and replaces its false target with
the teacher's belief; a clean pair that is merely hard has no confident alternative, keeps its target and is learnt
(the fixed-count ``doubt`` rule also distils those, and so stops learning them). At alpha = 0 the loss is exactly
open_clip's symmetric InfoNCE.

Like open_clip's ClipLoss, the loss owns what it needs: the gather of features across ranks, the logits and labels,
alpha at the step, D, the targets, and the statistics to log.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

from psdclip.schedule import make_schedule
from psdclip.teacher import EMATeacher

TEACHERS = ("self", "ema")
SCOPES = ("subset", "batch")
SUBSETS = ("random", "doubt", "outscored")


@dataclass
class DirectionLoss:
    """Per-row cross-entropies of one direction (image→text or text→image) and soft-target statistics."""

    per_row: Tensor  # (rows,) cross-entropy of each query row
    distilled: Tensor  # (rows,) bool, the row's pair is in D
    entropy: Tensor  # (distilled rows,) entropy of the soft target Q
    diagonal: Tensor  # (distilled rows,) Q's mass on the row's own pair


@dataclass
class PSDOutput:
    """One step of the loss: what to back-propagate, what to log, and what its targets were made from."""

    loss: Tensor  # mean over this rank's rows and both directions; back-propagate this
    stats: dict[str, Tensor]  # detached scalars to log (``loss`` averaged over ranks with ``local_loss``)
    logits_per_image: Tensor  # (rows, N) this rank's image rows against the global batch's captions
    teacher_logits_per_image: Tensor  # (rows, N) the teacher's, detached
    labels: Tensor  # (rows,) each row's own pair in the global batch
    distill: Tensor  # (N,) bool, D over the global batch
    mix: Tensor  # (N,) each pair's weight of the soft target against its one-hot target (0 outside D)


def soft_targets(
    teacher_logits: Tensor,
    own: Tensor,
    distill: Tensor,
    scope: str = "subset",
    tau_teacher: float = 1.0,
    mix: Tensor | float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Targets of distilled rows, ``mix`` × soft + (1 − ``mix``) × one-hot on ``own``, and the soft part alone.

    The soft part is softmax(teacher_logits / tau_teacher), restricted to D's pairs with ``scope="subset"``; ``mix`` is
    one weight or one per row.
    """
    teacher = teacher_logits.detach().float() / tau_teacher
    if scope == "subset":
        teacher = teacher.masked_fill(~distill, float("-inf"))
    soft = teacher.softmax(dim=-1)
    mix = torch.as_tensor(mix, dtype=soft.dtype, device=soft.device).reshape(-1, 1)
    target = mix * soft
    target[torch.arange(len(own), device=own.device), own] += 1.0 - mix.squeeze(1)
    return target, soft


def direction_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    distill: Tensor,
    scope: str = "subset",
    tau_teacher: float = 1.0,
    mix: Tensor | float = 1.0,
) -> DirectionLoss:
    """Cross-entropy of each query row against its (possibly soft) target.

    logits, teacher_logits: (rows, N) scores of each query against all N candidates.
    labels: (rows,) index of each row's own pair among the candidates.
    distill: (N,) bool mask of the distillation subset D over the candidates; a row is distilled when its
      own pair is in D. Rows may be a slice of the batch (local loss), since D is indexed globally.
    mix: the soft target's weight, one for all or (N,) one per pair.
    """
    per_row = F.cross_entropy(logits, labels, reduction="none")
    rows = distill[labels]
    if not rows.any():
        empty = logits.new_zeros(0)
        return DirectionLoss(per_row, rows, empty, empty)
    own = labels[rows]
    row_mix = mix[own] if isinstance(mix, Tensor) else mix
    target, soft = soft_targets(teacher_logits[rows], own, distill, scope, tau_teacher, row_mix)
    per_row = per_row.clone()
    per_row[rows] = F.cross_entropy(logits[rows], target.to(logits.dtype), reduction="none")
    entropy = torch.special.entr(soft).sum(dim=-1)
    diagonal = soft[torch.arange(len(own), device=own.device), own]
    return DirectionLoss(per_row, rows, entropy, diagonal)


def partner_probability(logits_per_image: Tensor, logits_per_text: Tensor, labels: Tensor, tau: float = 1.0) -> Tensor:
    """Each row's probability on its own partner, softmax(logits / tau), averaged over both directions: (rows,)."""
    rows = torch.arange(len(labels), device=labels.device)
    image = (logits_per_image.detach().float() / tau).log_softmax(dim=-1)[rows, labels]
    text = (logits_per_text.detach().float() / tau).log_softmax(dim=-1)[rows, labels]
    return (image.exp() + text.exp()) / 2


def partner_gap(logits_per_image: Tensor, logits_per_text: Tensor, labels: Tensor, tau: float = 1.0) -> Tensor:
    """How far each row's best candidate outscores its own partner, in logits / tau, averaged over both directions:
    (rows,), ≥ 0; 0 when the partner is the best candidate both ways."""
    rows = torch.arange(len(labels), device=labels.device)
    gaps = [
        (logits.detach().float() / tau).max(dim=-1).values - logits.detach().float()[rows, labels] / tau
        for logits in (logits_per_image, logits_per_text)
    ]
    return (gaps[0] + gaps[1]) / 2


def most_doubted(belief: Tensor, count: int) -> Tensor:
    """Bool mask of the ``count`` entries of ``belief`` with the lowest value; ties go to the lower index."""
    mask = torch.zeros(len(belief), dtype=torch.bool, device=belief.device)
    mask[torch.argsort(belief, stable=True)[:count]] = True
    return mask


class PSDLoss(nn.Module):
    """Symmetric contrastive loss with a scheduled progressive self-distillation subset.

    Args:
        alpha_max: final distillation ratio, in [0, 1).
        schedule: ``linear``, ``cosine`` or ``constant``; ramps alpha from 0 at ``ramp_start`` to ``alpha_max``
            at ``ramp_end`` (default: the last training step); an int is a step, a float a fraction of the training.
        subset: how D is chosen: ``outscored`` (of the pairs whose teacher's best candidate outscores their own
            partner by more than ``outscore_margin`` logits / tau_teacher, averaged over both directions, the at most
            floor(alpha·N) with the largest gap), ``doubt`` (the floor(alpha·N) pairs of the global batch with the lowest
            teacher probability on their own partner) or ``random`` (drawn from seed and step).
        outscore_margin: for ``outscored``, the gap in logits (a log-odds ratio: e² ≈ 7× at 2) that makes a pair
            suspect.
        outscore_ramp: for ``outscored``, the gap beyond the margin over which a pair's soft-target weight rises
            linearly from 0 to ``mix``: a pair barely past the margin (often a clean but hard one) keeps most of its
            one-hot target, so it can still be learnt and leave D, while a confidently misplaced one is fully
            distilled. 0: every pair past the margin gets ``mix`` at once.
        teacher: ``self`` (the student's own detached logits) or ``ema`` (a momentum copy of the model with decay
            ``ema_decay``, built by ``make_teacher``).
        scope: ``batch`` spreads soft targets over all N pairs; ``subset`` over D's own pairs only.
        tau_teacher: temperature of the soft targets (and of the doubt score).
        mix: weight of the soft target against the one-hot target for distilled rows.
        seed: seeds the per-step draw of a random D (it depends only on seed and step: reproducible, the same
            on every rank).
        local_loss: under DDP each rank scores only its own rows against the gathered columns (open_clip's
            ``local_loss``), O(N/W × N) logits per rank instead of N × N.
    """

    def __init__(
        self,
        alpha_max: float = 0.5,
        schedule: str = "linear",
        ramp_start: float = 0,
        ramp_end: float | None = None,
        subset: str = "outscored",
        teacher: str = "ema",
        ema_decay: float = 0.99,
        scope: str = "batch",
        tau_teacher: float = 1.0,
        mix: float = 1.0,
        outscore_margin: float = 2.0,
        outscore_ramp: float = 0.0,
        seed: int = 0,
        local_loss: bool = False,
    ):
        super().__init__()
        for name, value, choices in (
            ("teacher", teacher, TEACHERS),
            ("scope", scope, SCOPES),
            ("subset", subset, SUBSETS),
        ):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")
        if tau_teacher <= 0:
            raise ValueError(f"tau_teacher must be > 0, got {tau_teacher}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        if outscore_margin < 0:
            raise ValueError(f"outscore_margin must be >= 0, got {outscore_margin}")
        if outscore_ramp < 0:
            raise ValueError(f"outscore_ramp must be >= 0, got {outscore_ramp}")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        # the self teacher's untempered, unmixed soft target over the batch is the prediction itself: its rows carry no
        # gradient. For doubted rows that is loss truncation (dropping the suspect pairs), a rule in its own right; for
        # random rows it only throws data away.
        if (
            teacher == "self"
            and scope == "batch"
            and tau_teacher == 1.0
            and mix == 1.0
            and subset == "random"
            and alpha_max > 0
        ):
            raise ValueError(
                "teacher=self with scope=batch, tau_teacher=1 and mix=1 makes the soft target equal the prediction, "
                "so distilled pairs get no learning signal, and subset=random drops random pairs; use subset=doubt "
                "(loss truncation), scope=subset, teacher=ema, tau_teacher < 1 or mix < 1"
            )
        self.schedule = make_schedule(schedule, alpha_max, ramp_start, ramp_end)
        self.subset, self.teacher, self.ema_decay, self.scope = subset, teacher, ema_decay, scope
        self.tau_teacher, self.mix, self.seed, self.local_loss = tau_teacher, mix, seed, local_loss
        self.outscore_margin, self.outscore_ramp = outscore_margin, outscore_ramp

    @property
    def alpha_max(self) -> float:
        return self.schedule.alpha_max

    def make_teacher(self, model: nn.Module) -> EMATeacher | None:
        """The EMA copy of ``model`` that supplies targets, or None for the self teacher."""
        return EMATeacher(model, self.ema_decay) if self.teacher == "ema" and self.alpha_max > 0 else None

    def uses_teacher(self, step: int, total_steps: int) -> bool:
        """Whether the step's loss reads the EMA teacher's features: not while alpha is 0 (before the ramp), when D
        is empty and the teacher's forward would be wasted."""
        return self.teacher == "ema" and self.schedule(step, total_steps) > 0

    def distill_mask(self, batch_size: int, alpha: float, step: int) -> Tensor:
        """A random D as a bool mask over the global batch: floor(alpha * N) pairs drawn without replacement."""
        count = math.floor(alpha * batch_size)
        mask = torch.zeros(batch_size, dtype=torch.bool)
        if count:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            mask[torch.randperm(batch_size, generator=generator)[:count]] = True
        return mask

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        step: int,
        total_steps: int,
        teacher_features: dict[str, Tensor] | None = None,
        noise_marks: Tensor | None = None,
    ) -> PSDOutput:
        """The loss of this rank's pairs against the global batch.

        image_features, text_features: (n, d) normalised features of this rank's pairs; logit_scale: exp'd scale.
        teacher_features: the EMA teacher's ``image_features``, ``text_features`` and ``logit_scale`` (open_clip's
            output dict); None uses the student's own logits.
        noise_marks: (n,) 1 where the data marks the caption as corrupted, 0 clean, -1 unknown: only for the
            statistics (D's precision and recall), never for the loss.
        """
        per_image, per_text, labels = self.logits(image_features, text_features, logit_scale, grad=True)
        teacher_logits = None
        if teacher_features is not None:
            teacher_logits = self.logits(
                teacher_features["image_features"],
                teacher_features["text_features"],
                teacher_features["logit_scale"],
                grad=False,
            )[:2]
        marks = gather(noise_marks, grad=False) if noise_marks is not None else None
        return self.from_logits(
            per_image, per_text, labels, self.schedule(step, total_steps), step, teacher_logits, marks
        )

    def logits(self, image: Tensor, text: Tensor, logit_scale: Tensor, grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Image→text and text→image logits of this rank's rows against the gathered batch, in fp32, and the labels.

        Without ``local_loss`` every rank scores all N rows (identical losses); with it only its own n rows. Both give
        one process's gradient after DDP's mean: the gather's backward sums each rank's share into the feature's owner.
        """
        scale = at_least_fp32(logit_scale if grad else logit_scale.detach())
        all_image, all_text = at_least_fp32(gather(image, grad)), at_least_fp32(gather(text, grad))
        # autocast would run the matmuls in bf16/fp16 again: logits up to 100 would keep ~2 significant digits
        with torch.autocast(image.device.type, enabled=False):
            if self.local_loss:
                labels = torch.arange(len(image), device=image.device) + rank_and_world()[0] * len(image)
                return scale * at_least_fp32(image) @ all_text.T, scale * at_least_fp32(text) @ all_image.T, labels
            per_image = scale * all_image @ all_text.T
        return per_image, per_image.T, torch.arange(len(all_image), device=image.device)

    def from_logits(
        self,
        logits_per_image: Tensor,
        logits_per_text: Tensor,
        labels: Tensor,
        alpha: float,
        step: int,
        teacher_logits: tuple[Tensor, Tensor] | None = None,
        noise_marks: Tensor | None = None,
    ) -> PSDOutput:
        """The loss from logits: (rows, N) queries against the global batch, ``labels`` the rows' own pairs."""
        batch_size = logits_per_image.shape[1]
        teacher_image, teacher_text = teacher_logits or (logits_per_image, logits_per_text)
        distill, mix = self.choose_subset(teacher_image, teacher_text, labels, batch_size, alpha, step)
        options = {"scope": self.scope, "tau_teacher": self.tau_teacher, "mix": mix}
        image = direction_loss(logits_per_image, teacher_image, labels, distill, **options)
        text = direction_loss(logits_per_text, teacher_text, labels, distill, **options)
        loss = (image.per_row.mean() + text.per_row.mean()) / 2
        rows = image.distilled
        stats = {
            "loss": mean_over_ranks(loss.detach()) if self.local_loss else loss.detach(),
            "loss_hard": _mean_pair(image.per_row[~rows], text.per_row[~rows]),
            "loss_soft": _mean_pair(image.per_row[rows], text.per_row[rows]),
            "alpha": loss.new_full((), alpha),  # on the loss's device: no host-to-device copy
            "distill_count": distill.sum(),
            "soft_target_entropy": _mean_pair(image.entropy, text.entropy),
            "soft_target_diagonal": _mean_pair(image.diagonal, text.diagonal),
            "soft_target_weight": mix[distill].mean() if self.outscore_ramp else None,
            **subset_quality(distill, noise_marks),
        }
        stats = {name: value for name, value in stats.items() if value is not None}
        return PSDOutput(loss, stats, logits_per_image.detach(), teacher_image.detach(), labels, distill, mix)

    def choose_subset(
        self, teacher_image: Tensor, teacher_text: Tensor, labels: Tensor, batch_size: int, alpha: float, step: int
    ) -> tuple[Tensor, Tensor]:
        """D over the global batch, the same on every rank, and each pair's soft-target weight (0 outside D)."""
        count = math.floor(alpha * batch_size)
        if count == 0:  # CLIP, the ramp's start: made on the device, not on the host and copied every step
            distill = torch.zeros(batch_size, dtype=torch.bool, device=labels.device)
        elif self.subset == "random":
            distill = self.distill_mask(batch_size, alpha, step).to(labels.device)
        else:
            score = self.doubt(teacher_image, teacher_text, labels)
            # each rank scores its own rows (all N without local_loss, so the gather is then the identity)
            score = gather(score, grad=False) if len(score) < batch_size else score
            distill = self.doubted_subset(score, count)
            if self.subset == "outscored" and self.outscore_ramp:
                weight = ((score - self.outscore_margin) / self.outscore_ramp).clamp(0.0, 1.0)
                return distill, self.mix * weight * distill
        return distill, self.mix * distill.float()

    def doubt(self, teacher_image: Tensor, teacher_text: Tensor, labels: Tensor) -> Tensor:
        """The teacher's doubt of each row's pair, higher = more suspect: (rows,). ``subset=outscored``: how many
        logits (/ tau_teacher) its best candidate scores above its own partner; ``doubt``: 1 − partner probability."""
        if self.subset == "outscored":
            return partner_gap(teacher_image, teacher_text, labels, self.tau_teacher)
        return 1 - partner_probability(teacher_image, teacher_text, labels, self.tau_teacher)

    def doubted_subset(self, score: Tensor, count: int) -> Tensor:
        """Bool mask of the (at most) ``count`` most doubted pairs; ``outscored`` takes only pairs above the margin."""
        mask = most_doubted(-score, count)
        # the largest gaps first, so this keeps min(count, pairs past the margin) of them, with no host sync
        return mask & (score > self.outscore_margin) if self.subset == "outscored" else mask

    def targets(self, output: PSDOutput) -> Tensor:
        """The image→text targets the loss used for this rank's rows: (rows, N), one-hot outside D."""
        dtype = output.logits_per_image.dtype
        targets = F.one_hot(output.labels, output.logits_per_image.shape[1]).to(dtype)
        rows = output.distill[output.labels]
        if rows.any():
            targets[rows] = soft_targets(
                output.teacher_logits_per_image[rows],
                output.labels[rows],
                output.distill,
                self.scope,
                self.tau_teacher,
                output.mix[output.labels[rows]],
            )[0].to(dtype)
        return targets


def subset_quality(distill: Tensor, noise_marks: Tensor | None) -> dict[str, Tensor | None]:
    """Where the data marks corrupted captions: the batch's noise rate, D's precision (the share of D that is
    corrupted) and recall (the share of the batch's corrupted pairs in D), over the marked pairs."""
    if noise_marks is None or not (noise_marks >= 0).any():
        return {}
    known, corrupted = noise_marks >= 0, noise_marks == 1
    chosen, caught = (distill & known).sum(), (distill & corrupted).sum()
    return {
        "batch_noise": corrupted.sum() / known.sum(),
        "distill_precision": caught / chosen if chosen else None,
        "distill_recall": caught / corrupted.sum() if corrupted.any() else None,
    }


def at_least_fp32(tensor: Tensor) -> Tensor:
    """fp16/bf16 up to fp32 (the loss runs in fp32 under mixed precision); fp32 and fp64 as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(tensor: Tensor, grad: bool) -> Tensor:
    """``tensor`` of every rank concatenated along the first dimension (itself in a single process); with ``grad``,
    gradients flow back to each rank's own part (open_clip's ``gather_with_grad``)."""
    if rank_and_world()[1] == 1:
        return tensor
    if grad:
        return torch.cat(dist_nn.all_gather(tensor))
    parts = [torch.empty_like(tensor) for _ in range(rank_and_world()[1])]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def mean_over_ranks(value: Tensor) -> Tensor:
    if rank_and_world()[1] == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / rank_and_world()[1]


def _mean_pair(first: Tensor, second: Tensor) -> Tensor | None:
    """Mean over both directions; None when there are no such rows, so nothing fake is logged."""
    both = torch.cat([first.detach(), second.detach()])
    return both.mean() if len(both) else None
