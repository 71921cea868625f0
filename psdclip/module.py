"""The LightningModule: encode both towers (and the EMA teacher's) → PSD loss → log; the optimiser and LR schedule
of the ``optim`` config."""

import math
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from psdclip.loss import PSDLoss, PSDOutput
from psdclip.models import CLIPBundle, NormalizedEncoders

MAX_LOGIT_SCALE = math.log(100.0)
NOISE_DIAGNOSTICS = ("batch_noise", "distill_precision", "distill_recall")


class PSDCLIPModule(NormalizedEncoders, L.LightningModule):
    """open_clip dual encoder trained with the PSD loss.

    Args:
        clip: the model with its preprocessing and tokenizer (from ``psdclip.models.create_clip``).
        loss: the PSD (or, with alpha_max=0, plain CLIP) loss; it says whether an EMA teacher is kept.
        optimizer: makes the optimiser from parameter groups (e.g. ``functools.partial(torch.optim.AdamW, lr=1e-3)``,
            what ``optim.optimizer`` instantiates); gains, biases, norms, scalars and ``logit_scale`` get no decay.
        scheduler: makes the LR schedule from the optimiser and the run's total steps (``warmup_cosine_schedule``).
        micro_batches: compute each batch in this many pieces with the same loss and gradients as the whole batch
            (the loss, D and the teacher's targets span the whole batch), for ~1/K of the activation memory at the
            cost of one extra no-grad forward pass (see ``step_in_micro_batches``).
    """

    flops_per_batch = None  # read by ThroughputMonitor; FLOPs are not counted, samples/s are

    def __init__(
        self,
        clip: CLIPBundle,
        loss: PSDLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler],
        micro_batches: int = 1,
    ):
        super().__init__()
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.save_hyperparameters(ignore=["clip", "loss", "optimizer", "scheduler"])  # the run's config holds them
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        self.hparams["model_name"] = clip.name
        self.model, self.loss = clip.model, loss
        self.tokenizer, self.eval_transform = clip.tokenizer, clip.eval_transform
        self.teacher = loss.make_teacher(self.model)
        # micro-batches need a backward pass per piece inside the step, which Lightning allows only when optimising by hand
        self.automatic_optimization = micro_batches == 1

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> dict:
        """``batch``: images, tokens and optionally the data's noise marks (diagnostics only)."""
        images, texts, *marks = batch
        noise_marks = marks[0] if marks else None
        if self.automatic_optimization:
            outputs = self.model(images, texts)
            teacher = self.teacher(images, texts) if self.teacher_needed() else None
            result = self.psd_loss(outputs, teacher, noise_marks)
        else:
            result = self.step_in_micro_batches(images, texts, noise_marks)
        stats = {**result.stats, "logit_scale": self.model.logit_scale.detach().exp()}
        for name, value in stats.items():
            # how well D catches wrong captions is noisy per step: its epoch mean (train/<name>_epoch) is the figure
            epoch_mean = name in NOISE_DIAGNOSTICS
            self.log(
                f"train/{name}", value.float(), prog_bar=name in ("loss", "alpha"), on_step=True, on_epoch=epoch_mean
            )
        # the step's own loss output travels to callbacks (the media callback draws the targets it used)
        return {"loss": result.loss, "psd": result}

    def teacher_needed(self) -> bool:
        """The teacher's forward runs only at the steps whose loss reads it (it is still updated every step)."""
        steps = self.trainer.estimated_stepping_batches
        return self.teacher is not None and self.loss.uses_teacher(self.global_step, steps)

    def psd_loss(
        self, outputs: dict[str, Tensor], teacher: dict[str, Tensor] | None, noise_marks: Tensor | None
    ) -> PSDOutput:
        """The loss of the whole batch from the student's (and the teacher's) open_clip output dicts."""
        return self.loss(
            outputs["image_features"],
            outputs["text_features"],
            outputs["logit_scale"],
            self.global_step,
            self.trainer.estimated_stepping_batches,
            teacher,
            noise_marks,
        )

    def step_in_micro_batches(self, images: Tensor, texts: Tensor, noise_marks: Tensor | None) -> PSDOutput:
        """One optimiser step on the batch, computed in ``micro_batches`` pieces, with one backward pass.

        1. Encode each piece under activation checkpointing: only its features are kept, its activations are not.
        2. Compute the loss of the whole batch on these features (and the teacher's, encoded piece by piece without
           gradients): every pair is a negative of every other, D and the teacher's targets are the whole batch's.
        3. One ``manual_backward`` of that loss: autograd reaches each piece's checkpoint in turn and recomputes its
           activations there, so one piece's activations are alive at a time, and the gradients are the whole batch's.

        The same cost as open_clip's ``--accum-freq`` (one extra forward pass), but one backward pass per step, not
        one per piece: DDP all-reduces once, in the order its reducer expects (static graph and gradient-as-bucket-view
        included; several backward passes inside one DDP forward break its first static-graph iteration), and the
        precision plugin's loss scaling (16-mixed) covers the features' gradients too. Checkpointing replays each
        piece's random state, so dropout draws the same masks in the recomputation.
        """
        pieces = [
            piece
            for piece in zip(
                images.tensor_split(self.hparams.micro_batches), texts.tensor_split(self.hparams.micro_batches)
            )
            if len(piece[0])
        ]
        outputs = concat_outputs([checkpoint(self.model, *piece, use_reentrant=False) for piece in pieces])
        with torch.no_grad():
            teacher = concat_outputs([self.teacher(*piece) for piece in pieces]) if self.teacher_needed() else None
        result = self.psd_loss(outputs, teacher, noise_marks)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(result.loss)
        optimizer.step()
        self.lr_schedulers().step()
        self.after_optimizer_step()
        return result

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Clamp the temperature and move the EMA teacher towards the stepped weights."""
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        # a step skipped for a non-finite loss (psdclip.callbacks.nonfinite) leaves no gradients: the teacher waits too
        if self.teacher is not None and any(p.grad is not None for p in self.model.parameters()):
            self.teacher.update(self.model)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            # open_clip's rule: gains, biases, norms, scalars and logit_scale are not decayed
            exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            (no_decay if exclude else decay).append(param)
        optimizer = self.make_optimizer([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        schedule = self.make_scheduler(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` × the LR at ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio)
    )


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def pairs_in_batch(batch: tuple[Tensor, Tensor]) -> int:
    """Image–caption pairs in a batch (for Lightning's ThroughputMonitor)."""
    return len(batch[0])


def concat_outputs(outputs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """open_clip output dicts of consecutive pieces of a batch as one: features concatenated, the scale kept once."""
    return {
        "image_features": torch.cat([out["image_features"] for out in outputs]),
        "text_features": torch.cat([out["text_features"] for out in outputs]),
        "logit_scale": outputs[0]["logit_scale"],
    }
