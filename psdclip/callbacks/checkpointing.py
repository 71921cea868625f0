"""Resumable checkpoints (a Lightning callback): a checkpoint at the last step and on a signalled stop, every rank's
RNG states and the data-stream position; the files themselves are handled by ``psdclip.run.checkpoint_files``."""

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from psdclip.run.checkpoint_files import remove_stale_partials

log = logging.getLogger(__name__)


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus what an exact resume and a job's end need.

    - ``last.ckpt`` at the last step, written when that step ends, before any end-of-epoch or end-of-training hook
      (evaluation, media) runs: an error there never costs the weights;
    - ``last.ckpt`` at the current step when the job receives SIGTERM or SLURM's warning signal (``StopOnSignal``
      stops every rank after the same step);
    - the RNG states of torch, CUDA (the rank's device), numpy and ``random`` of every rank, each restored on its rank
      (a checkpoint of N ranks resumes on any other number: extra ranks take rank 0's);
    - stale partial files of writes killed midway are removed at start-up.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved_step: int | None = None  # the step of the newest checkpoint written in this process

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if finishes_training(trainer, batch_idx):
            self.save_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a stop the last batch could not foresee (e.g. should_stop set at an epoch's end); Lightning's own
        # on_train_end only covers runs that saved nothing, which this covers too
        self.save_now(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        # StopOnSignal raises StopRequested (a SIGTERMException) after the same step on every rank, so the save's
        # barrier is safe; other errors may strike one rank only, where a collective save would hang
        if isinstance(exception, SIGTERMException):
            self.save_now(trainer)

    def save_now(self, trainer: L.Trainer) -> str | None:
        """Write ``last.ckpt`` (the step file without ``save_last``) unless a checkpoint of this step exists; its path."""
        if (
            self.saved_step == trainer.global_step
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or trainer.fast_dev_run
        ):
            return None
        metrics = {
            **trainer.callback_metrics,
            "epoch": torch.tensor(trainer.current_epoch),
            "step": torch.tensor(trainer.global_step),
        }
        if self.save_last:
            path = self.last_model_path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
        else:
            path = self.format_checkpoint_name(metrics)
        trainer.save_checkpoint(path, self.save_weights_only)
        log.info("saved %s at step %d", path, trainer.global_step)
        return path

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.saved_step = trainer.global_step  # every save (periodic, final, on SIGTERM) passes here, on every rank
        # every rank's own streams (a collective: every rank saves together), so each rank resumes its own
        checkpoint["rng_states"] = {"ranks": gather_from_ranks(trainer, rng_states())}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            log.warning("checkpoint has no RNG states; random streams restart from the seed")
            return
        saved = states.get("ranks") or [states]  # older checkpoints: rank 0's states only
        if len(saved) != trainer.world_size and trainer.is_global_zero:
            log.warning(
                "checkpoint saved by %d rank(s), resumed on %d: ranks without a saved state take rank 0's",
                len(saved),
                trainer.world_size,
            )
        restore_rng_states(saved[trainer.global_rank] if trainer.global_rank < len(saved) else saved[0])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and "://" not in str(self.dirpath):
            remove_stale_partials(Path(self.dirpath))


def rng_states() -> dict[str, Any]:
    """This process's random states: torch's, its current CUDA device's (a rank drives one), numpy's and ``random``'s."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": _plain(np.random.get_state()),  # plain types: checkpoints load with weights_only=True
        "python": random.getstate(),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the random states ``rng_states`` returned; the CUDA state goes to the current device only, so a checkpoint
    of any GPU count resumes on any other (older checkpoints hold rank 0's list of every device's state: this
    device's entry where there is one)."""
    torch.set_rng_state(states["torch"])
    cuda = states["cuda"]
    if isinstance(cuda, list):  # an older checkpoint's
        cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)] if cuda and torch.cuda.is_available() else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(states["python"])


def gather_from_ranks(trainer: L.Trainer, value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (a collective under DDP; on one process, a list of one)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def finishes_training(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the batch that just ended is the run's last: ``max_steps`` reached, the last batch of the last epoch,
    or a stop requested (``trainer.should_stop``)."""
    if trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step:
        return True
    last_epoch = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1
    return last_epoch and batch_idx + 1 >= trainer.num_training_batches


def _plain(state: tuple) -> tuple:
    return tuple(item.tolist() if isinstance(item, np.ndarray) else item for item in state)
