"""The LightningModule: encode both towers → gather across ranks → PSD loss → log; AdamW with warm-up + cosine."""

import math

import lightning as L
import torch
from torch import Tensor

from psdclip.loss import PSDLoss
from psdclip.models import CLIPBundle
from psdclip.teacher import EMATeacher

MAX_LOGIT_SCALE = math.log(100.0)


class PSDCLIPModule(L.LightningModule):
    """open_clip dual encoder trained with the PSD loss.

    Args:
        clip: the model with its preprocessing and tokenizer (from ``psdclip.models.create_clip``).
        loss: the PSD (or, with alpha_max=0, plain CLIP) loss; ``loss.teacher == "ema"`` adds an EMA teacher.
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
        self.teacher = EMATeacher(self.model, loss.ema_decay) if loss.teacher == "ema" else None

    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens, normalize=True)

    def _logits(self, outputs: dict[str, Tensor], sync_grads: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Image→text and text→image logits of this rank's rows against the global batch, and the rows' labels.

        Features are gathered from every rank (with gradients for the student). Without ``local_loss`` every
        rank scores all N rows (identical losses); with it, only its own N/W rows. Both give one process's
        gradient after DDP's mean: the gather's backward sums each rank's share into the feature's owner.
        """
        image, text, scale = outputs["image_features"], outputs["text_features"], outputs["logit_scale"].float()
        all_image, all_text = image, text
        if self.trainer.world_size > 1:
            all_image = self.all_gather(image, sync_grads=sync_grads).flatten(0, 1)
            all_text = self.all_gather(text, sync_grads=sync_grads).flatten(0, 1)
        all_image, all_text = all_image.float(), all_text.float()  # the loss runs in fp32 under mixed precision
        if self.loss.local_loss:
            labels = torch.arange(len(image), device=self.device) + self.global_rank * len(image)
            return scale * image.float() @ all_text.T, scale * text.float() @ all_image.T, labels
        logits_per_image = scale * all_image @ all_text.T
        return logits_per_image, logits_per_image.T, torch.arange(len(all_image), device=self.device)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, texts = batch
        logits_per_image, logits_per_text, labels = self._logits(self.model(images, texts), sync_grads=True)
        teacher_logits = None
        if self.teacher is not None:
            teacher_logits = self._logits(self.teacher(images, texts), sync_grads=False)[:2]
        step, total = self.global_step, self.trainer.estimated_stepping_batches
        stats = self.loss(logits_per_image, logits_per_text, labels, self.loss.schedule(step, total), step, teacher_logits)
        stats["logit_scale"] = self.model.logit_scale.detach().exp()
        # with local_loss each rank holds its rows' loss: average it; the sub-statistics are rank 0's rows
        local = self.loss.local_loss and self.trainer.world_size > 1
        shown = {"loss", "alpha"}
        for name, value in stats.items():
            self.log(f"train/{name}", value.float(), prog_bar=name in shown, sync_dist=local and name == "loss")
        return stats["loss"]

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
