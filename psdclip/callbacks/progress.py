"""Progress: Lightning's rich bar in a terminal, one log line every few steps elsewhere (batch jobs, CI, log files)."""

import logging
import sys

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from psdclip.run.runlog import file_log

log = logging.getLogger(__name__)

# ThroughputMonitor's figures: all ranks (logged when world_size > 1), else this device
SAMPLES_PER_SEC = ("train/samples_per_sec", "train/device/samples_per_sec")


def short_metrics(trainer, metrics: dict) -> dict:
    """Progress-bar metrics without the ``train/`` prefix, plus samples/s once ThroughputMonitor has measured it."""
    shown = {name.removeprefix("train/"): value for name, value in metrics.items()}
    rate = next((trainer.logged_metrics[key] for key in SAMPLES_PER_SEC if key in trainer.logged_metrics), None)
    if rate is not None:
        shown["samples/s"] = float(rate)
    return shown


def epoch_label(trainer) -> str:
    """``Epoch 1/3`` … ``Epoch 3/3`` (counted from 1, like the total), or ``Epoch 1`` when ``max_steps`` ends the run."""
    label = f"Epoch {trainer.current_epoch + 1}"
    return f"{label}/{trainer.max_epochs}" if trainer.max_epochs is not None and trainer.max_epochs > 0 else label


def sync_epoch_metrics(trainer) -> None:
    """Compute the epoch's metrics on every rank. A value logged at epoch level with ``sync_dist`` (or a torchmetrics
    metric) is reduced over the ranks when first read; a bar that read it on rank 0 alone would wait there forever for
    the others (Lightning disables the bar on every other rank)."""
    trainer.progress_bar_metrics  # noqa: B018 - reading is what computes them


def report_line(trainer, metrics: dict, where: str = "") -> str:
    """One progress line: epoch, step of the total, ``where`` and every metric."""
    figures = "  ".join(
        f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}" for name, value in metrics.items()
    )
    total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
    return "  ".join(
        part for part in (epoch_label(trainer), f"step {trainer.global_step}/{total}", where, figures) if part
    )


class RichProgress(RichProgressBar):
    """The rich bar showing loss, alpha (the current distillation ratio) and samples/s; every ``every_n_steps`` steps
    the same figures go to the run's log file, which the bar never reaches."""

    def __init__(self, every_n_steps: int = 50, **kwargs):
        super().__init__(**kwargs)
        self.every_n_steps = every_n_steps

    def get_metrics(self, trainer, pl_module) -> dict:
        return short_metrics(trainer, super().get_metrics(trainer, pl_module))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # Lightning's bar reads "Epoch 0/2" for 3 epochs (both counted from 0)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=epoch_label(trainer))
            self.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.is_global_zero and trainer.global_step % self.every_n_steps == 0:
            file_log.info(report_line(trainer, self.get_metrics(trainer, pl_module)))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        sync_epoch_metrics(trainer)
        super().on_train_epoch_end(trainer, pl_module)


class LogProgress(ProgressBar):
    """A plain progress report: one INFO line every ``every_n_steps`` optimiser steps and at each epoch's end."""

    def __init__(self, every_n_steps: int = 50):
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _report(self, trainer, pl_module, where: str) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        log.info(report_line(trainer, short_metrics(trainer, self.get_metrics(trainer, pl_module)), where))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._report(trainer, pl_module, "")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        sync_epoch_metrics(trainer)
        self._report(trainer, pl_module, "(epoch end)")


def progress_bar(enabled: bool = True, style: str = "auto", every_n_steps: int = 50) -> ProgressBar | None:
    """The progress reporter for this process: ``style`` ``rich``, ``log``, or ``auto`` (rich when stdout is a terminal).

    Returns None when ``enabled`` is false, as Lightning refuses a progress-bar callback with ``enable_progress_bar=False``.
    """
    styles = ("auto", "rich", "log")
    if style not in styles:
        raise ValueError(f"unknown progress style {style!r}; choose one of {styles}")
    if not enabled:
        return None
    if style == "rich" or (style == "auto" and sys.stdout.isatty()):
        return RichProgress(every_n_steps)
    return LogProgress(every_n_steps)
