"""The LightningModule: encode both towers (and the EMA teacher's, where the loss reads it) → PSD loss → log; it
builds and updates the teacher, and makes the optimiser and LR schedule it is given."""

from collections.abc import Callable
from typing import NamedTuple

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchmetrics import Metric

from psdclip.loss import QUALITY_COUNTS, PSDLoss, PSDOutput
from psdclip.models import MAX_LOGIT_SCALE, CLIPBundle, NormalizedEncoders
from psdclip.teacher import Teacher

# the key of the training step's output that carries the loss's PSDOutput to callbacks (the media callback)
LOSS_OUTPUT = "psd"
# D against the data's corruption marks, over an epoch and all ranks: logged names → (numerator, denominator) of
# QUALITY_COUNTS
DIAGNOSTICS = {
    "train/batch_noise_epoch": ("corrupted", "marked"),
    "train/distill_precision_epoch": ("caught", "chosen_marked"),
    "train/distill_recall_epoch": ("caught", "corrupted"),
}


class CountRatio(Metric):
    """numerator / denominator of counts summed over the updates and, at ``compute``, over the ranks (NaN while the
    denominator is 0). An update only adds on the device: no host sync."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("numerator", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("denominator", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, numerator: Tensor, denominator: Tensor) -> None:
        self.numerator += numerator
        self.denominator += denominator

    def compute(self) -> Tensor:
        return self.numerator / self.denominator


class PairInfo(NamedTuple):
    """What a batch says of its pairs besides images and tokens (each None where the data does not say)."""

    noise_marks: Tensor | None = None  # 1 corrupted caption, 0 clean, -1 unknown: diagnostics only
    pair_ids: Tensor | None = None  # each pair's identity (psdclip.data), for rules that remember pairs
    planted: Tensor | None = None  # threshold pairs: given another pair's caption on purpose


class PSDCLIPModule(NormalizedEncoders, L.LightningModule):
    """open_clip dual encoder trained with the PSD loss.

    Args:
        clip: the model with its preprocessing and tokenizer (from ``psdclip.models.create_clip``).
        loss: the PSD (or, with alpha_max=0, plain CLIP) loss.
        teacher: builds the teacher from the student (``teacher=ema``: ``EMATeacher``; ``teacher=frozen``: an earlier
            run's model, ``FrozenTeacher``), or None for the self teacher (the student's own detached logits). Plain
            CLIP (alpha_max = 0) never builds one.
        optimizer: makes the optimiser from parameter groups (e.g. ``functools.partial(torch.optim.AdamW, lr=1e-3)``,
            what ``optim.optimizer`` instantiates); gains, biases, norms, scalars and ``logit_scale`` get no decay.
        scheduler: makes the LR schedule from the optimiser and the run's total steps (``optim.scheduler``).
        micro_batches: compute each batch in this many pieces with the same loss and gradients as the whole batch
            (the loss, D and the teacher's targets span the whole batch), for ~1/K of the activation memory at the
            cost of one extra no-grad forward pass (see ``step_in_micro_batches``).
    """

    def __init__(
        self,
        clip: CLIPBundle,
        loss: PSDLoss,
        teacher: Callable[[nn.Module], Teacher] | None,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler],
        micro_batches: int,
    ):
        super().__init__()
        # the run's config holds the rest
        self.save_hyperparameters(ignore=["clip", "loss", "teacher", "optimizer", "scheduler"])
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        self.hparams["model_name"] = clip.name
        self.model, self.loss = clip.model, loss
        self.tokenizer, self.eval_transform = clip.tokenizer, clip.eval_transform
        self.teacher = teacher(self.model) if teacher is not None and loss.alpha_max > 0 else None
        loss.check_teacher(self.teacher is not None)
        self.diagnostics = nn.ModuleDict({name: CountRatio() for name in DIAGNOSTICS})
        # micro-batches need a backward pass per piece inside the step, which Lightning allows only when optimising by hand
        self.automatic_optimization = micro_batches == 1

    def setup(self, stage: str) -> None:
        """Size the subset rule's per-pair state by the data (before a checkpoint restores it)."""
        datamodule = self.trainer.datamodule if self.trainer else None
        self.loss.subset.fit_data(getattr(datamodule, "pair_space", lambda: None)())

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> dict:
        """``batch``: images, tokens and optionally ``PairInfo``'s fields in order."""
        images, texts, *info = batch
        info = PairInfo(*info)
        if self.automatic_optimization:
            outputs = self.model(images, texts)
            teacher = self.teacher(images, texts) if self.teacher_needed() else None
            result = self.psd_loss(outputs, teacher, info)
        else:
            result = self.step_in_micro_batches(images, texts, info)
        stats = {**result.stats, "logit_scale": self.model.logit_scale.detach().exp()}
        for name, value in stats.items():
            self.log(f"train/{name}", value.float(), prog_bar=name in ("loss", "alpha"), on_step=True)
        counts = dict(zip(QUALITY_COUNTS, result.quality, strict=True))
        for name, (numerator, denominator) in DIAGNOSTICS.items():
            self.diagnostics[name].update(counts[numerator], counts[denominator])
        # the step's own loss output travels to callbacks (the media callback draws the targets it used)
        return {"loss": result.loss, LOSS_OUTPUT: result}

    def on_train_epoch_end(self) -> None:
        """D's precision and recall over the epoch and all ranks where the data marks corrupted captions, and what the
        subset rule learnt about the data (host syncs once per epoch)."""
        for name, metric in self.diagnostics.items():
            # compute sums the ranks' counts, so every rank sees the same value; Lightning logs the cached result and
            # resets the metric. One left unlogged has a zero denominator, hence a zero numerator: nothing carries over
            if torch.isfinite(metric.compute()):
                self.log(name, metric)
        for name, value in self.loss.subset.epoch_statistics().items():
            if torch.isfinite(value):
                # the same on every rank (the rule sees the gathered batch), but Lightning warns about an epoch-level
                # tensor logged without sync_dist under DDP; a max over ranks is the value exactly, for one all-reduce
                # of a scalar per epoch. The estimate of the data's noise also goes on the console's progress lines
                self.log(
                    f"train/{name}", value.float(), prog_bar=name == "noise_estimate", sync_dist=True, reduce_fx="max"
                )

    def alpha(self) -> float:
        return self.loss.schedule(self.global_step, self.trainer.estimated_stepping_batches)

    def teacher_needed(self) -> bool:
        """The teacher's forward runs only at the steps whose loss reads it (it is still updated every step): not
        while alpha is 0, when D is empty."""
        return self.teacher is not None and self.alpha() > 0

    def psd_loss(self, outputs: dict[str, Tensor], teacher: dict[str, Tensor] | None, info: PairInfo) -> PSDOutput:
        """The loss of the whole batch from the student's (and the teacher's) open_clip output dicts."""
        return self.loss(
            outputs["image_features"],
            outputs["text_features"],
            outputs["logit_scale"],
            self.global_step,
            self.trainer.estimated_stepping_batches,
            teacher_features=teacher,
            pair_ids=info.pair_ids,
            planted=info.planted,
            noise_marks=info.noise_marks,
            alpha=self.alpha(),
        )

    def step_in_micro_batches(self, images: Tensor, texts: Tensor, info: PairInfo) -> PSDOutput:
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
        result = self.psd_loss(outputs, teacher, info)
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


def pairs_in_batch(batch: tuple[Tensor, Tensor]) -> int:
    """Image–caption pairs in a batch (for the throughput callback)."""
    return len(batch[0])


def concat_outputs(outputs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """open_clip output dicts of consecutive pieces of a batch as one: features concatenated, the scale kept once."""
    return {
        "image_features": torch.cat([out["image_features"] for out in outputs]),
        "text_features": torch.cat([out["text_features"] for out in outputs]),
        "logit_scale": outputs[0]["logit_scale"],
    }
