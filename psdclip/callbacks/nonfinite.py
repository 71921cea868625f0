"""Skip optimiser steps whose loss is not finite; stop the run when several come in a row."""

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_consecutive`` non-finite losses in a row."""


class SkipNonFiniteLoss(Callback):
    """A step whose loss (any micro-batch, any rank) is NaN/inf is skipped on every rank and counted.

    Skipping drops the step's gradients before the optimiser runs, so weights, AdamW moments and the EMA teacher
    stay as they were; the step counter, LR and alpha schedules still advance (like AMP's GradScaler).
    ``train/nonfinite_steps`` logs the running count.
    """

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = self.consecutive = 0
        self._bad = False

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._bad = self._bad or not bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        bad = trainer.strategy.reduce_boolean_decision(self._bad, all=False)  # every rank skips together
        self._bad = False
        if not bad:
            self.consecutive = 0
        else:
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched
            self.skipped, self.consecutive = self.skipped + 1, self.consecutive + 1
            log.warning("non-finite loss at step %d: step skipped (%d so far)", trainer.global_step, self.skipped)
        pl_module.log("train/nonfinite_steps", float(self.skipped))
        if self.consecutive >= self.max_consecutive:
            checkpoint = trainer.checkpoint_callback
            last = (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint else ""
            raise NonFiniteLossError(
                f"{self.consecutive} non-finite losses in a row, the last at step {trainer.global_step}; stopping. "
                f"Last checkpoint: {last or 'none saved yet'}. Lower the learning rate, use bf16-mixed instead of "
                "16-mixed, or resume with ckpt_path=<that checkpoint>"
            )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped, self.consecutive = state_dict["skipped"], state_dict["consecutive"]
