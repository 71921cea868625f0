"""Resumable checkpoints: atomic writes, a checkpoint at the end, RNG and data-stream position, `ckpt_path=last`."""

import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, then renames it into place.

    A crash or a full disk mid-write leaves the previous ``last.ckpt`` untouched (rename is atomic on POSIX).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # object stores: uploads are atomic
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus what an exact resume needs.

    - a checkpoint at the end of training even when the last step is no multiple of ``every_n_train_steps``;
    - the RNG states of torch, CUDA, numpy and ``random`` (rank 0's, restored on every rank);
    - the data-stream position: after a mid-epoch resume the first ``batches done`` batches of the restarted
      epoch's stream are skipped, so the run sees the same batches as an uninterrupted one.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _plain(np.random.get_state()),  # plain types: checkpoints load with weights_only=True
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            log.warning("checkpoint has no RNG states; random streams restart from the seed")
            return
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        name, keys, *rest = states["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        random.setstate(states["python"])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        datamodule = trainer.datamodule
        if stage == "fit" and datamodule is not None and not hasattr(datamodule.train_dataloader, "resumes"):
            make_loader = datamodule.train_dataloader

            def resuming_loader():
                return SkipOnResume(make_loader, trainer)

            resuming_loader.resumes = True
            datamodule.train_dataloader = resuming_loader


def _plain(state: tuple) -> tuple:
    return tuple(item.tolist() if isinstance(item, np.ndarray) else item for item in state)


class SkipOnResume:
    """A training loader that, in the first pass after a mid-epoch resume, skips the batches already trained on.

    The count is Lightning's own (``batch_progress.current.ready``, which it also adds to the fetched count).
    The loader is rebuilt once the restored epoch is known (Lightning first builds it before restoring, to count
    the steps), so the stream restarts from the interrupted epoch (webdataset shuffles are seeded by seed + epoch).
    """

    def __init__(self, make_loader, trainer: L.Trainer):
        self.make_loader, self.trainer = make_loader, trainer
        self.loader, self.epoch = make_loader(), trainer.current_epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __iter__(self):
        # a generator: the count is read at the first batch, after Lightning has restored its loops
        # (the loader is first iterated earlier, when the schedules ask for the number of steps)
        loop = self.trainer.fit_loop
        if self.epoch != self.trainer.current_epoch:  # built before the restore: rebuild for the restored epoch
            self.loader, self.epoch = self.make_loader(), self.trainer.current_epoch
        skip = loop.epoch_loop.batch_progress.current.ready if loop.restarting else 0
        skip = skip if skip < len(self.loader) else 0  # a finished epoch: the next one starts afresh
        iterator = iter(self.loader)
        if skip:
            log.info("resuming mid-epoch %d: skipping the %d batches already trained on", self.trainer.current_epoch, skip)
        for _ in range(skip):
            next(iterator)
        yield from iterator


def resolve_ckpt_path(ckpt_path: str | None, log_dir: str, task_name: str) -> str | None:
    """``last`` → the newest ``last.ckpt`` under ``<log_dir>/<task_name>/`` (single runs and sweeps); paths pass."""
    if ckpt_path != "last":
        if ckpt_path and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} is not a file")
        return ckpt_path
    candidates = sorted(Path(log_dir, task_name).glob(f"**/checkpoints/{LAST}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(
            f"ckpt_path=last: no {LAST} under {Path(log_dir, task_name)}; give the checkpoint's path instead"
        )
    log.info("ckpt_path=last resolves to %s", candidates[-1])
    return str(candidates[-1])
