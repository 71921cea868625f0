"""A train.py callback that counts the host syncs of a few training steps (``torch.cuda.set_sync_debug_mode``), for
``bench/device_check.sh``: ``+callbacks.syncs._target_=bench.sync_window.SyncWindow``."""

import traceback
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import torch


class SyncWindow(L.Callback):
    """Counts the host syncs torch reports under ``set_sync_debug_mode("warn")`` in training steps ``first + 1`` to
    ``last``, each with the line of psdclip (else Lightning) code that asked for it, and prints them when training
    ends. A callback for train.py: ``+callbacks.syncs._target_=bench.sync_window.SyncWindow``."""

    def __init__(self, first: int = 2, last: int = 7):
        self.first, self.last, self.sites = first, last, Counter()

    def record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        frames = [frame for frame in traceback.extract_stack()[:-1] if "warnings" not in frame.filename]
        ours = [frame for frame in frames if "psdclip" in frame.filename or "lightning" in frame.filename]
        site = (ours or frames)[-1]
        self.sites[f"{Path(site.filename).name}:{site.lineno} {site.line}"] += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first and torch.cuda.is_available():
            warnings.simplefilter("always")
            warnings.showwarning = self.record
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.last and torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        if not torch.cuda.is_available():
            print("host syncs: not counted without a GPU")
            return
        steps, total = self.last - self.first, sum(self.sites.values())
        for site, count in self.sites.most_common(8):  # "  >" lines: device_check.sh shows them under its PASS line
            print(f"  > {count:4d}  {site}")
        print(f"host syncs: {total / steps:.1f} per step ({total} in steps {self.first + 1}-{self.last})")
