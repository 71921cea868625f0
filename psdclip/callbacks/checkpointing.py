"""Resumable checkpoints: atomic writes, a checkpoint at the last step and on SIGTERM, RNG and data-stream position,
`ckpt_path=last` (the newest complete checkpoint)."""

import errno
import io
import logging
import os
import random
import re
import shutil
import socket
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from psdclip.callbacks.stopping import slurm_job_id, slurm_requeued_run_folders

log = logging.getLogger(__name__)

LAST = "last.ckpt"
# the temporary file of a write in progress: `.<name>.<pid>@<host>.partial` (older runs wrote no `@<host>`)
PARTIAL = re.compile(r"^\..+\.(?P<pid>\d+)(?:@(?P<host>.+))?\.partial$")


class IncompleteCheckpointError(ValueError):
    """A checkpoint file that torch cannot read back (truncated or corrupt)."""


class DiskFullError(OSError):
    """A checkpoint write that ran out of space (or quota); its message says where and what is left."""


def disk_full(path: Path, exn: OSError) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    previous = f"the previous {path.name} is intact" if path.is_file() else f"no earlier {path.name} exists"
    return DiskFullError(
        exn.errno,
        f"disk full: writing the checkpoint {path} failed ({exn.strerror}; {free} in {path.parent}); {previous} and "
        "no partial file is left. Free space there (or move paths.log_dir), then resume with ckpt_path=last",
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, then renames it into place.

    A crash or a full disk mid-write leaves the previous ``last.ckpt`` untouched (rename is atomic on POSIX). The
    temporary file lies on the checkpoint's own disk (Lightning's writer stages it in the system's temporary folder,
    often a small or RAM-backed /tmp on compute nodes, and copies it over), and a full disk stops the run with a
    ``DiskFullError`` that says where.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)  # object stores: uploads are atomic
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # named after its writer, so a later start-up can tell a dead write's leftover from a live one
        partial = path.with_name(f".{path.name}.{os.getpid()}@{socket.gethostname()}.partial")
        try:
            self.write(checkpoint, partial)
            os.replace(partial, path)
        except OSError as exn:
            partial.unlink(missing_ok=True)  # before the message measures the free space
            if exn.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(path, exn) from exn
            raise
        finally:
            partial.unlink(missing_ok=True)

    def write(self, checkpoint: dict[str, Any], path: Path) -> None:
        """``checkpoint`` into the file ``path``, on disk when this returns."""
        serialised = io.BytesIO()
        torch.save(checkpoint, serialised)  # in memory first, as Lightning does: a full disk is then a plain OSError
        with open(path, "wb") as file:
            file.write(serialised.getbuffer())
            file.flush()
            os.fsync(file.fileno())  # before the rename makes it last.ckpt: a power cut cannot leave an empty one


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


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a whole torch checkpoint: a zip archive whose directory (written last) lists the pickle.

    Reads only the archive's directory, so it is cheap for large checkpoints; truncated files fail it.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def newest_complete(paths: Iterable[Path]) -> Path | None:
    """The most recently written complete checkpoint among ``paths`` (incomplete ones are skipped with a warning)."""
    for path in sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True):
        if is_complete(path):
            return path
        log.warning("skipping %s: not a complete checkpoint (truncated or corrupt)", path)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete partial checkpoint files whose writer, a process of this host, is gone (killed mid-write)."""
    host, removed = socket.gethostname(), []
    for path in folder.glob(".*.partial"):
        match = PARTIAL.match(path.name)
        pid = int(match["pid"]) if match else 0
        # a write in progress (live writer) or one from another host is left alone
        if pid > 0 and (match["host"] or host) == host and not _alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.warning(
            "removed %d partial checkpoint file(s) of killed writes: %s", len(removed), ", ".join(map(str, removed))
        )
    return removed


def check_complete(path: Path, use: str = "use it instead") -> None:
    """Raise ``IncompleteCheckpointError`` naming ``path`` and the newest complete checkpoint beside it, if any
    (``use``, formatted with its path, says what to do with it)."""
    if is_complete(path):
        return
    good = newest_complete(p for p in path.parent.glob("*.ckpt") if p != path)
    offer = (
        f"the newest complete checkpoint beside it is {good}: {use.format(good)}"
        if good
        else "no complete checkpoint lies beside it"
    )
    raise IncompleteCheckpointError(
        f"{path} is not a complete checkpoint (truncated or corrupt; torch fails with 'PytorchStreamReader failed'); "
        f"{offer}"
    )


def resolve_ckpt_path(ckpt_path: str | None, log_dir: str, task_name: str) -> str | None:
    """``last`` → the newest complete checkpoint (``last.ckpt`` or a step file) under ``<log_dir>/<task_name>/``
    (single runs and sweeps); a path is checked to be a complete checkpoint. Stale partial files are removed.
    Without a path, a requeued SLURM job resumes from the newest complete checkpoint of its earlier starts."""
    if ckpt_path is None:
        return requeued_checkpoint(log_dir, task_name)
    if ckpt_path != "last":
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} is not a file")
        remove_stale_partials(path.parent)
        check_complete(path, use="resume with ckpt_path={}")
        return ckpt_path
    root = Path(log_dir, task_name)
    for folder in root.glob("**/checkpoints"):
        remove_stale_partials(folder)
    # a write killed midway leaves the previous last.ckpt behind, older than the step file written just before it
    newest = newest_complete(root.glob("**/checkpoints/*.ckpt"))
    if newest is None:
        raise FileNotFoundError(
            f"ckpt_path=last: no {LAST} or other complete checkpoint under {root}; give the checkpoint's path instead"
        )
    log.info("ckpt_path=last resolves to %s", newest)
    return str(newest)


def requeued_checkpoint(log_dir: str, task_name: str) -> str | None:
    """The newest complete checkpoint that earlier starts of this SLURM job wrote, where this start is a requeued one
    (by ``scontrol requeue`` on the warning signal, or by SLURM after a node failure); else None."""
    folders = slurm_requeued_run_folders(log_dir, task_name)
    if not folders:
        return None
    newest = newest_complete(path for folder in folders for path in Path(folder, "checkpoints").glob("*.ckpt"))
    if newest is None:
        log.warning(
            "requeued SLURM job %s: its earlier starts left no complete checkpoint; starting anew", slurm_job_id()
        )
        return None
    log.info("requeued SLURM job %s resumes from %s", slurm_job_id(), newest)
    return str(newest)
