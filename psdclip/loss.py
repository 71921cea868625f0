"""Progressive self-distillation (PSD) loss, a drop-in generalisation of open_clip's ClipLoss.

For a batch of N pairs, a random subset D of floor(alpha * N) pairs trades its one-hot target for
the teacher's soft alignment over the batch; every other pair keeps the usual contrastive target.
At alpha = 0 the loss is exactly open_clip's symmetric InfoNCE.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psdclip.schedule import make_schedule

TEACHERS = ("self", "ema")
SCOPES = ("subset", "batch")


@dataclass
class DirectionLoss:
    """Per-row cross-entropies of one direction (image→text or text→image) and soft-target statistics."""

    per_row: Tensor  # (rows,) cross-entropy of each query row
    distilled: Tensor  # (rows,) bool, the row's pair is in D
    entropy: Tensor  # (distilled rows,) entropy of the soft target Q
    diagonal: Tensor  # (distilled rows,) Q's mass on the row's own pair


def soft_targets(teacher_logits: Tensor, own: Tensor, distill: Tensor, scope: str = "subset", tau_teacher: float = 1.0,
                 mix: float = 1.0) -> tuple[Tensor, Tensor]:
    """Targets of distilled rows, ``mix`` × soft + (1 − ``mix``) × one-hot on ``own``, and the soft part alone.

    The soft part is softmax(teacher_logits / tau_teacher), restricted to D's pairs with ``scope="subset"``.
    """
    teacher = teacher_logits.detach().float() / tau_teacher
    if scope == "subset":
        teacher = teacher.masked_fill(~distill, float("-inf"))
    soft = teacher.softmax(dim=-1)
    target = mix * soft
    target[torch.arange(len(own), device=own.device), own] += 1.0 - mix
    return target, soft


def direction_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    distill: Tensor,
    scope: str = "subset",
    tau_teacher: float = 1.0,
    mix: float = 1.0,
) -> DirectionLoss:
    """Cross-entropy of each query row against its (possibly soft) target.

    logits, teacher_logits: (rows, N) scores of each query against all N candidates.
    labels: (rows,) index of each row's own pair among the candidates.
    distill: (N,) bool mask of the distillation subset D over the candidates; a row is distilled when its
      own pair is in D. Rows may be a slice of the batch (local loss), since D is indexed globally.
    """
    per_row = F.cross_entropy(logits, labels, reduction="none")
    rows = distill[labels]
    if not rows.any():
        empty = logits.new_zeros(0)
        return DirectionLoss(per_row, rows, empty, empty)
    own = labels[rows]
    target, soft = soft_targets(teacher_logits[rows], own, distill, scope, tau_teacher, mix)
    per_row = per_row.clone()
    per_row[rows] = F.cross_entropy(logits[rows], target.to(logits.dtype), reduction="none")
    entropy = torch.special.entr(soft).sum(dim=-1)
    diagonal = soft[torch.arange(len(own), device=own.device), own]
    return DirectionLoss(per_row, rows, entropy, diagonal)


class PSDLoss(nn.Module):
    """Symmetric contrastive loss with a scheduled progressive self-distillation subset.

    Args:
        alpha_max: final distillation ratio, in [0, 1).
        schedule: ``linear``, ``cosine`` or ``constant``; ramps alpha from 0 at ``ramp_start`` to ``alpha_max``
            at ``ramp_end`` (default: the last training step).
        teacher: ``self`` (the student's own detached logits) or ``ema`` (a momentum copy of the model,
            kept by the LightningModule with decay ``ema_decay``).
        scope: ``subset`` spreads soft targets over D's own pairs only; ``batch`` over all N.
        tau_teacher: temperature of the soft targets.
        mix: weight of the soft target against the one-hot target for distilled rows.
        seed: seeds the per-step draw of D (the draw depends only on seed and step, so it is reproducible
            and identical on every rank).
        local_loss: read by the LightningModule under DDP: each rank scores only its own rows against the
            gathered columns (open_clip's ``local_loss``), O(N/W × N) logits per rank instead of N × N.
    """

    def __init__(
        self,
        alpha_max: float = 0.5,
        schedule: str = "linear",
        ramp_start: int = 0,
        ramp_end: int | None = None,
        teacher: str = "self",
        ema_decay: float = 0.999,
        scope: str = "subset",
        tau_teacher: float = 1.0,
        mix: float = 1.0,
        seed: int = 0,
        local_loss: bool = False,
    ):
        super().__init__()
        if teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {teacher!r}; choose one of {TEACHERS}")
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
        if tau_teacher <= 0:
            raise ValueError(f"tau_teacher must be > 0, got {tau_teacher}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        if teacher == "self" and scope == "batch" and tau_teacher == 1.0 and alpha_max > 0:
            raise ValueError(
                "teacher=self with scope=batch and tau_teacher=1 makes the soft target equal the prediction, "
                "so distilled pairs get no learning signal; use scope=subset, teacher=ema, or tau_teacher < 1"
            )
        self.schedule = make_schedule(schedule, alpha_max, ramp_start, ramp_end)
        self.teacher, self.ema_decay, self.scope = teacher, ema_decay, scope
        self.tau_teacher, self.mix, self.seed, self.local_loss = tau_teacher, mix, seed, local_loss

    @property
    def alpha_max(self) -> float:
        return self.schedule.alpha_max

    def distill_mask(self, batch_size: int, alpha: float, step: int) -> Tensor:
        """D as a bool mask over the global batch: floor(alpha * N) pairs drawn without replacement."""
        count = math.floor(alpha * batch_size)
        mask = torch.zeros(batch_size, dtype=torch.bool)
        if count:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            mask[torch.randperm(batch_size, generator=generator)[:count]] = True
        return mask

    def forward(
        self,
        logits_per_image: Tensor,
        logits_per_text: Tensor,
        labels: Tensor,
        alpha: float,
        step: int,
        teacher_logits: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Loss and its statistics.

        logits_per_image: (rows, N) local image queries against all N texts; logits_per_text likewise;
        labels: (rows,) global index of each local row's pair. With rows = N this is the whole batch.
        teacher_logits: the EMA teacher's (per_image, per_text) logits; ``None`` uses the student's own.
        """
        batch_size = logits_per_image.shape[1]
        distill = self.distill_mask(batch_size, alpha, step).to(labels.device)
        teacher_image, teacher_text = teacher_logits or (logits_per_image, logits_per_text)
        options = dict(scope=self.scope, tau_teacher=self.tau_teacher, mix=self.mix)
        image = direction_loss(logits_per_image, teacher_image, labels, distill, **options)
        text = direction_loss(logits_per_text, teacher_text, labels, distill, **options)
        rows = image.distilled
        stats = {
            "loss": (image.per_row.mean() + text.per_row.mean()) / 2,
            "loss_hard": _mean_pair(image.per_row[~rows], text.per_row[~rows]),
            "loss_soft": _mean_pair(image.per_row[rows], text.per_row[rows]),
            "alpha": torch.tensor(alpha),
            "distill_count": distill.sum(),
            "soft_target_entropy": _mean_pair(image.entropy, text.entropy),
            "soft_target_diagonal": _mean_pair(image.diagonal, text.diagonal),
        }
        return {name: value for name, value in stats.items() if value is not None}


def _mean_pair(first: Tensor, second: Tensor) -> Tensor | None:
    """Mean over both directions; None when there are no such rows, so nothing fake is logged."""
    both = torch.cat([first.detach(), second.detach()])
    return both.mean() if len(both) else None
