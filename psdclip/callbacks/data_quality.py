"""Report what the training stream skipped: ``data/skipped/<kind>`` and ``data/refilled`` (totals over all ranks)."""

import logging

import lightning as L
import torch

from psdclip.data.samples import COUNTERS

log = logging.getLogger(__name__)


class DataQualityMonitor(L.Callback):
    """Logs the running totals of skipped samples by kind each ``every_n_steps`` and sums up each epoch.

    The counts travel with the batches from the DataLoader workers to the DataModule (``ShardDataModule.skipped``),
    so they are exact however many workers there are; across ranks they are summed.
    """

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps
        self.at_epoch_start = torch.zeros(len(COUNTERS), dtype=torch.int64)

    @staticmethod
    def totals(trainer: L.Trainer) -> torch.Tensor | None:
        counts = getattr(trainer.datamodule, "skipped", None)
        if counts is None:
            return None
        return trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum").cpu()

    @staticmethod
    def log_totals(pl_module: L.LightningModule, totals: torch.Tensor, at_epoch_end: bool = False) -> None:
        for name, value in zip(COUNTERS, totals.tolist()):
            metric = "data/refilled" if name == "refilled" else f"data/skipped/{name}"
            # totals are the same on every rank, but Lightning warns about an epoch-level value logged without
            # sync_dist under DDP: a max over ranks is the value exactly, for one scalar all-reduce per epoch
            pl_module.log(
                metric,
                float(value),
                on_step=not at_epoch_end,
                on_epoch=at_epoch_end,
                reduce_fx="max",
                sync_dist=at_epoch_end,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps == 0 and (totals := self.totals(trainer)) is not None:
            self.log_totals(pl_module, totals)

    def on_train_epoch_end(self, trainer, pl_module):
        totals = self.totals(trainer)
        if totals is None:
            return
        self.log_totals(pl_module, totals, at_epoch_end=True)
        epoch = totals - self.at_epoch_start
        # a copy: on one device ``totals`` is the DataModule's own counter, which grows in place
        self.at_epoch_start = totals.clone()
        if trainer.is_global_zero and epoch.sum() > 0:
            found = ", ".join(f"{count} {name}" for name, count in zip(COUNTERS, epoch.tolist()) if count)
            log.warning(
                "epoch %d: the data stream skipped bad data and read replacements: %s", trainer.current_epoch, found
            )
