"""Undo optimiser steps whose loss is not finite; stop the run when several come in a row. The loss is checked on the
device; the host reads the verdict once per window of steps, not every step."""

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.distributed import ReduceOp

from psdclip.callbacks.checkpointing import finishes_training
from psdclip.callbacks.throughput import logs_this_step

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_consecutive`` non-finite losses in a row."""


class SkipNonFiniteLoss(Callback):
    """A step whose loss (any micro-batch, any rank) is NaN/inf is undone on every rank and counted.

    Each backward pass marks a non-finite loss on the device, without waiting for it. Every ``check_every_n_steps``
    optimiser steps (and at the last) the host reads the window's marks, with one all-reduce across ranks. When a
    window holds a non-finite loss, the whole window is undone: its last step is skipped (its gradients are dropped
    before the optimiser runs) and, for ``check_every_n_steps > 1``, the weights, buffers, EMA teacher (the module's
    state) and the optimiser's state (AdamW's moments and step counts) return to the copy taken on the device at the
    window's start; the good steps of that window are lost with the bad one. With 1, only the bad step is skipped and
    no copy is kept. The step counter, LR and alpha schedules still advance (like AMP's GradScaler).
    ``train/nonfinite_steps`` logs the running count of undone steps.

    Choose ``every_n_train_steps`` of the checkpoint a multiple of ``check_every_n_steps``: a checkpoint written
    inside a window may hold a step that the window's check undoes.
    """

    def __init__(self, max_consecutive: int = 5, check_every_n_steps: int = 1):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.max_consecutive, self.check_every_n_steps = max_consecutive, check_every_n_steps
        self.skipped = self.consecutive = 0
        self.logged: int | None = None  # the count last logged
        self.window = WindowMarks()
        self.saved: StateCopy | None = None
        self.copy_after_step = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.check_every_n_steps > 1:
            self.saved = StateCopy(pl_module, trainer.optimizers)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self.window.mark_loss(loss)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.window.end_step()
        step = trainer.global_step + 1  # the step about to be taken, counted from 1
        if step % self.check_every_n_steps == 0 or 0 < trainer.max_steps <= step:
            if self.check(trainer, pl_module):
                optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched
            elif self.check_every_n_steps > 1:
                self.copy_after_step = True  # the window was good: copy once the step (and the teacher's) is done

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.window.steps and finishes_training(trainer, batch_idx):
            self.check(trainer, pl_module)  # a run that ends between checks (epochs, a stop): its last steps
        if self.copy_after_step:
            self.saved = StateCopy(pl_module, trainer.optimizers)
            self.copy_after_step = False
        # a Python number goes to the device with a sync: only when it is written or has just changed
        if logs_this_step(trainer) or self.skipped != self.logged:
            pl_module.log("train/nonfinite_steps", float(self.skipped))
            self.logged = self.skipped

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Read the window's marks (every rank the same) and undo the window if it saw a non-finite loss; whether it
        did. Raises ``NonFiniteLossError`` after ``max_consecutive`` non-finite losses in a row."""
        steps, (bad, trailing) = self.window.steps, self.window.read(trainer)
        self.window = WindowMarks()
        if not bad:
            self.consecutive = 0
            return False
        if self.saved is not None:
            self.saved.restore(pl_module, trainer.optimizers)
        self.skipped += steps
        # a streak: the window's trailing bad steps, plus the earlier ones when the whole window was bad
        self.consecutive = self.consecutive + bad if bad == steps else trailing
        log.warning(
            "non-finite loss in %d of the %d step(s) up to step %d: %s undone (%d so far)",
            bad,
            steps,
            trainer.global_step + 1,
            "that step" if steps == 1 else "those steps",
            self.skipped,
        )
        if self.consecutive >= self.max_consecutive:
            checkpoint = trainer.checkpoint_callback
            last = (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint else ""
            raise NonFiniteLossError(
                f"{self.consecutive} non-finite losses in a row, the last at step {trainer.global_step}; stopping. "
                f"Last checkpoint: {last or 'none saved yet'}. Lower the learning rate, use bf16-mixed instead of "
                "16-mixed, or resume with ckpt_path=<that checkpoint>"
            )
        return True

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped, self.consecutive = state_dict["skipped"], state_dict["consecutive"]


class WindowMarks:
    """Device-side counts over the steps since the last check: steps with a non-finite loss, and how many of the
    latest steps in a row had one. Nothing here waits for the device until ``read``."""

    def __init__(self):
        self.steps = 0
        self.this_step: Tensor | None = None  # any non-finite loss in the current step's backward passes
        self.bad: Tensor | None = None
        self.trailing: Tensor | None = None

    def mark_loss(self, loss: Tensor) -> None:
        nonfinite = ~torch.isfinite(loss.detach()).all()
        self.this_step = nonfinite if self.this_step is None else self.this_step | nonfinite

    def end_step(self) -> None:
        self.steps += 1
        if self.this_step is None:  # no backward pass this step
            return
        bad = self.this_step.long()
        self.bad = bad if self.bad is None else self.bad + bad
        self.trailing = bad if self.trailing is None else (self.trailing + 1) * bad
        self.this_step = None

    def read(self, trainer: L.Trainer) -> tuple[int, int]:
        """(steps with a non-finite loss on any rank, trailing streak on any rank): one all-reduce and one sync."""
        device = trainer.strategy.root_device
        marks = torch.stack([self.bad, self.trailing]) if self.bad is not None else torch.zeros(2, dtype=torch.long)
        bad, trailing = trainer.strategy.reduce(marks.to(device), reduce_op=ReduceOp.MAX).tolist()
        return int(bad), int(trailing)


class StateCopy:
    """A copy, on the device, of the module's state (student, teacher, buffers) and of the optimisers' state."""

    def __init__(self, pl_module: L.LightningModule, optimizers: list[torch.optim.Optimizer]):
        self.module = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}
        self.optimizers = [
            {param: {key: clone(value) for key, value in state.items()} for param, state in optimizer.state.items()}
            for optimizer in optimizers
        ]

    def restore(self, pl_module: L.LightningModule, optimizers: list[torch.optim.Optimizer]) -> None:
        """Copy the state back in place (a checkpoint being written shares these tensors)."""
        pl_module.load_state_dict(self.module)
        for optimizer, saved in zip(optimizers, self.optimizers, strict=True):
            for param in list(optimizer.state):
                if param not in saved:  # first stepped in this window: fresh again, as AdamW makes it lazily
                    del optimizer.state[param]
                    continue
                for key, value in saved[param].items():
                    current = optimizer.state[param].get(key)
                    if isinstance(current, Tensor) and isinstance(value, Tensor):
                        current.copy_(value)
                    else:
                        optimizer.state[param][key] = clone(value)


def clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else value
