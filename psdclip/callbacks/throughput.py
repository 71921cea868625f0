"""Training samples/s, measured between logging steps: the device is synchronised only when the figure is logged."""

import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning sends this step's logged values to the loggers (asked in ``on_train_batch_end``, after the
    optimiser step has counted): every ``trainer.log_every_n_steps`` steps, and when the run stops."""
    every = trainer.log_every_n_steps
    return (every > 0 and trainer.global_step % every == 0) or trainer.should_stop


class StepThroughput(Callback):
    """Logs ``train/device/samples_per_sec`` and ``train/device/batches_per_sec`` (and ``train/samples_per_sec`` of
    all ranks when there are several) over the steps since the previous logging step.

    Lightning's ThroughputMonitor times every batch and so waits for the GPU after each (``cuda.synchronize``); the
    average over a logging interval needs the wait only at its two ends, and lets the host run ahead in between.
    """

    def __init__(self, batch_size_fn: Callable[[Any], int]):
        self.batch_size_fn = batch_size_fn
        self.samples = self.batches = 0
        self.started = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restart(self.device_time(trainer))

    def restart(self, now: float) -> None:
        self.samples = self.batches = 0
        self.started = now

    @staticmethod
    def device_time(trainer: L.Trainer) -> float:
        """The wall-clock time once the device has finished the work queued so far."""
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.samples += self.batch_size_fn(batch)
        self.batches += 1
        if not logs_this_step(trainer):
            return
        now = self.device_time(trainer)
        elapsed = now - self.started
        rates = {
            "train/device/samples_per_sec": self.samples / elapsed,
            "train/device/batches_per_sec": self.batches / elapsed,
        }
        if trainer.world_size > 1:
            rates["train/samples_per_sec"] = rates["train/device/samples_per_sec"] * trainer.world_size
        for name, value in rates.items():
            pl_module.log(name, value, on_step=True, on_epoch=False)
        self.restart(now)
