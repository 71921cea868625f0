"""Progressive self-distillation (PSD) loss, a drop-in generalisation of open_clip's ClipLoss.

For a global batch of N pairs, a distillation subset D of at most floor(alpha·N) pairs trades its one-hot target for
the teacher's soft alignment; every other pair keeps the usual contrastive target. alpha follows a schedule; which
pairs form D is a pluggable rule (``psdclip.subsets``). At alpha = 0 the loss is exactly open_clip's symmetric InfoNCE.

As open_clip's ``DistillClipLoss``, the loss is handed the teacher's features (the training step owns the teacher);
it gathers features across ranks, builds logits, asks its rule for D, builds the targets and returns the loss with
the targets it used. It runs on the device without host syncs.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psdclip.distributed import gather, mean_over_ranks, rank_and_world
from psdclip.schedule import make_schedule
from psdclip.subsets import RandomSubset, Subset, SubsetQuery, SubsetRule

SCOPES = ("subset", "batch")
# what the data's corruption marks say about D (diagnostics only, never the loss), summed per epoch and over the ranks
# by the module
QUALITY_COUNTS = ("marked", "corrupted", "chosen_marked", "caught")


@dataclass
class PSDOutput:
    """One step of the loss: what to back-propagate, what to log, and the targets it used."""

    loss: Tensor  # mean over this rank's rows and both directions; back-propagate this
    stats: dict[str, Tensor]  # detached scalars to log per step (NaN where a figure has no rows this step)
    quality: Tensor  # (len(QUALITY_COUNTS),) this rank's marked pairs and those in D, for D's precision/recall
    logits_per_image: Tensor  # (rows, N) this rank's image rows against the global batch's captions, detached
    targets_per_image: Tensor  # (rows, N) the image→text targets the loss used
    labels: Tensor  # (rows,) each row's own pair in the global batch
    subset: Subset  # D over the global batch and each pair's soft-target weight


def targets(teacher_logits: Tensor, labels: Tensor, subset: Subset, scope: str, mix: float) -> tuple[Tensor, Tensor]:
    """Each row's target: for rows whose pair is in D, ``mix``·weight × softmax(teacher_logits) + the rest on the
    own pair; one-hot elsewhere. Also the soft part. ``teacher_logits``: (rows, N), already tempered; ``scope``
    ``subset`` restricts the soft part to D's pairs."""
    teacher = teacher_logits.detach().float()
    if scope == "subset":
        teacher = teacher.masked_fill(~subset.chosen, float("-inf"))
    soft = teacher.softmax(dim=-1)
    one_hot = F.one_hot(labels, teacher.shape[1]).to(soft.dtype)
    weight = (mix * subset.weight)[labels].to(soft.dtype).unsqueeze(1)
    mixed = weight * soft + (1.0 - weight) * one_hot
    # a row outside D keeps its one-hot target (its soft part may be undefined: no D pair to spread over)
    return torch.where(subset.chosen[labels].unsqueeze(1), mixed, one_hot), soft


class PSDLoss(nn.Module):
    """Symmetric contrastive loss with a scheduled progressive self-distillation subset.

    Args:
        subset: the rule that chooses D (``psdclip.subsets``; the ``loss/subset`` config group).
        alpha_max: final distillation ratio, in [0, 1): D holds at most floor(alpha·N) pairs.
        schedule: ``linear``, ``cosine`` or ``constant``; ramps alpha from 0 at ``ramp_start`` to ``alpha_max``
            at ``ramp_end`` (null: the last training step); an int is a step, a float a fraction of the training.
        scope: ``batch`` spreads soft targets over all N pairs; ``subset`` over D's own pairs only.
        tau_teacher: temperature of the teacher's logits, for the soft targets and the rule's evidence.
        mix: weight of the soft target against the one-hot target for distilled rows.
        local_loss: under DDP each rank scores only its own rows against the gathered columns (open_clip's
            ``local_loss``), O(N/W × N) logits per rank instead of N × N.
    """

    def __init__(
        self,
        subset: SubsetRule,
        alpha_max: float,
        schedule: str,
        ramp_start: float,
        ramp_end: float | None,
        scope: str,
        tau_teacher: float,
        mix: float,
        local_loss: bool,
    ):
        super().__init__()
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
        if tau_teacher <= 0:
            raise ValueError(f"tau_teacher must be > 0, got {tau_teacher}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        self.subset, self.schedule = subset, make_schedule(schedule, alpha_max, ramp_start, ramp_end)
        self.scope, self.tau_teacher, self.mix, self.local_loss = scope, tau_teacher, mix, local_loss

    @property
    def alpha_max(self) -> float:
        return self.schedule.alpha_max

    def check_teacher(self, has_teacher: bool) -> None:
        """Refuse a self-distillation that cannot teach: without a teacher the untempered, unmixed soft target over
        the batch is the prediction itself, so distilled rows carry no gradient; for doubted rows that is loss
        truncation (a rule in its own right), for random rows it only throws data away."""
        useless = self.scope == "batch" and self.tau_teacher == 1.0 and self.mix == 1.0
        if not has_teacher and useless and isinstance(self.subset, RandomSubset) and self.alpha_max > 0:
            raise ValueError(
                "teacher=self with scope=batch, tau_teacher=1 and mix=1 makes the soft target equal the prediction, "
                "so distilled pairs get no learning signal, and subset=random drops random pairs; use loss/subset="
                "outscored (loss truncation), loss.scope=subset, teacher=ema, tau_teacher < 1 or mix < 1"
            )

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        step: int | Tensor,
        total_steps: int,
        teacher_features: dict[str, Tensor] | None = None,
        pair_ids: Tensor | None = None,
        planted: Tensor | None = None,
        noise_marks: Tensor | None = None,
        alpha: float | Tensor | None = None,
    ) -> PSDOutput:
        """The loss of this rank's pairs against the global batch.

        image_features, text_features: (n, d) normalised features of this rank's pairs; logit_scale: exp'd scale.
        teacher_features: the teacher's ``image_features``, ``text_features`` and ``logit_scale`` (open_clip's
            output dict); None uses the student's own detached logits.
        pair_ids, planted: (n,) each pair's identity and threshold-pair flag, for rules that remember pairs.
        noise_marks: (n,) 1 where the data marks the caption as corrupted, 0 clean, -1 unknown: only for the
            statistics (D's precision and recall), never for the loss.
        alpha: the step's ratio when the caller already has it (a tensor keeps a compiled loss from specialising on
            it); by default the schedule's at ``step``.
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
        return self.from_logits(
            per_image, per_text, labels, step, total_steps, teacher_logits, pair_ids, planted, noise_marks, alpha
        )

    def from_logits(
        self,
        per_image: Tensor,
        per_text: Tensor,
        labels: Tensor,
        step: int | Tensor,
        total_steps: int,
        teacher_logits: tuple[Tensor, Tensor] | None = None,
        pair_ids: Tensor | None = None,
        planted: Tensor | None = None,
        noise_marks: Tensor | None = None,
        alpha: float | Tensor | None = None,
    ) -> PSDOutput:
        """The loss from logits: (rows, N) queries of this rank against the global batch, ``labels`` the rows' own
        pairs; ``teacher_logits`` the teacher's (image→text, text→image) of the same shape, None: the student's own."""
        if teacher_logits is None:
            teacher_image, teacher_text = per_image.detach(), per_text.detach()
        else:
            teacher_image, teacher_text = teacher_logits
        batch_size = per_image.shape[1]
        alpha = self.schedule(step, total_steps) if alpha is None else alpha
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=labels.device)
        query = SubsetQuery(
            teacher_image / self.tau_teacher,
            teacher_text / self.tau_teacher,
            labels,
            torch.floor(alpha * batch_size).long(),
            step,
            total_steps,
            gather(pair_ids, grad=False) if pair_ids is not None else None,
            gather(planted, grad=False) if planted is not None else None,
        )
        subset = self.subset(query)
        image_targets, image_soft = targets(query.teacher_image, labels, subset, self.scope, self.mix)
        text_targets, text_soft = targets(query.teacher_text, labels, subset, self.scope, self.mix)
        image_rows = F.cross_entropy(per_image, image_targets.to(per_image.dtype), reduction="none")
        text_rows = F.cross_entropy(per_text, text_targets.to(per_text.dtype), reduction="none")
        loss = (image_rows.mean() + text_rows.mean()) / 2

        distilled = subset.chosen[labels]
        rows = torch.arange(len(labels), device=labels.device)
        stats = {
            "loss": mean_over_ranks(loss.detach()) if self.local_loss else loss.detach(),
            "loss_hard": masked_mean(image_rows, text_rows, ~distilled),
            "loss_soft": masked_mean(image_rows, text_rows, distilled),
            "alpha": alpha.to(loss.dtype),
            "distill_count": subset.chosen.sum(),
            "soft_target_entropy": masked_mean(
                torch.special.entr(image_soft).sum(-1), torch.special.entr(text_soft).sum(-1), distilled
            ),
            "soft_target_diagonal": masked_mean(image_soft[rows, labels], text_soft[rows, labels], distilled),
            "soft_target_weight": (subset.weight * subset.chosen).sum() / subset.chosen.sum(),
        }
        rank, world = rank_and_world()
        # this rank's own pairs against D (gather orders the ranks' equal shares): the module's metrics sum the ranks
        own_chosen = subset.chosen.chunk(world)[rank]
        return PSDOutput(
            loss,
            stats,
            quality_counts(own_chosen, noise_marks),
            per_image.detach(),
            image_targets,
            labels,
            subset,
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


def masked_mean(image_rows: Tensor, text_rows: Tensor, rows: Tensor) -> Tensor:
    """Mean over both directions of the rows in ``rows`` (NaN when there are none: nothing fake is logged)."""
    total = (image_rows.detach() * rows).sum() + (text_rows.detach() * rows).sum()
    return total / (2 * rows.sum())


def quality_counts(chosen: Tensor, noise_marks: Tensor | None) -> Tensor:
    """``QUALITY_COUNTS`` of one batch: pairs the data marks (clean or corrupted), corrupted ones, marked ones in
    D, and corrupted ones in D."""
    if noise_marks is None:
        return chosen.new_zeros(len(QUALITY_COUNTS), dtype=torch.int64)
    marked, corrupted = noise_marks >= 0, noise_marks == 1
    return torch.stack([marked.sum(), corrupted.sum(), (chosen & marked).sum(), (chosen & corrupted).sum()])


def at_least_fp32(tensor: Tensor) -> Tensor:
    """fp16/bf16 up to fp32 (the loss runs in fp32 under mixed precision); fp32 and fp64 as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
