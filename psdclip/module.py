"""The LightningModule: encode both towers (and the EMA teacher's) → PSD loss → log; AdamW with warm-up + cosine."""

import math

import lightning as L
import torch
from torch import Tensor

from psdclip.loss import PSDLoss
from psdclip.models import CLIPBundle

MAX_LOGIT_SCALE = math.log(100.0)
NOISE_DIAGNOSTICS = ("batch_noise", "distill_precision", "distill_recall")


class PSDCLIPModule(L.LightningModule):
    """open_clip dual encoder trained with the PSD loss.

    Args:
        clip: the model with its preprocessing and tokenizer (from ``psdclip.models.create_clip``).
        loss: the PSD (or, with alpha_max=0, plain CLIP) loss; it says whether an EMA teacher is kept.
        lr, weight_decay, betas, eps: AdamW; no decay on gains, biases, norms, scalars and ``logit_scale``.
        warmup_steps: linear warm-up before the cosine decay to ``min_lr_ratio * lr`` at the last step.
    """

    flops_per_batch = None  # read by ThroughputMonitor; FLOPs are not counted, samples/s are

    def __init__(
        self,
        clip: CLIPBundle,
        loss: PSDLoss,
        lr: float = 5e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["clip", "loss"])
        self.hparams["model_name"] = clip.name
        self.model, self.loss = clip.model, loss
        self.tokenizer, self.eval_transform = clip.tokenizer, clip.eval_transform
        self.teacher = loss.make_teacher(self.model)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens, normalize=True)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> dict:
        """``batch``: images, tokens and optionally the data's noise marks (diagnostics only)."""
        images, texts, *marks = batch
        outputs = self.model(images, texts)
        teacher = self.teacher(images, texts) if self.teacher is not None else None
        result = self.loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"], self.global_step,
                           self.trainer.estimated_stepping_batches, teacher, marks[0] if marks else None)
        stats = {**result.stats, "logit_scale": self.model.logit_scale.detach().exp()}
        for name, value in stats.items():
            # how well D catches wrong captions is noisy per step: its epoch mean (train/<name>_epoch) is the figure
            epoch_mean = name in NOISE_DIAGNOSTICS
            self.log(f"train/{name}", value.float(), prog_bar=name in ("loss", "alpha"), on_step=True, on_epoch=epoch_mean)
        # the step's own loss output travels to callbacks (the media callback draws the targets it used)
        return {"loss": result.loss, "psd": result}

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        # a step skipped for a non-finite loss (psdclip.nonfinite) leaves no gradients: the teacher waits too
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
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
        )
        total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def pairs_in_batch(batch: tuple[Tensor, Tensor]) -> int:
    """Image–caption pairs in a batch (for Lightning's ThroughputMonitor)."""
    return len(batch[0])
