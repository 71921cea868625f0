"""Stopping a job that a scheduler cancels or pre-empts: every rank stops after the same step, with one checkpoint.

A scheduler signals every rank of a job, each at its own moment: one rank may get the signal in the middle of a step
that another has finished. Lightning's SIGTERM handler broadcasts from inside the signal handler, a collective that
each rank enters wherever its signal happens to land; under DDP the ranks then wait for each other in different
collectives and the job hangs. ``StopOnSignal`` instead notes the signal and lets the ranks agree at the end of each
training step, in one all-reduce that every rank enters at the same point; then every rank raises ``StopRequested``,
``ResumableCheckpoint`` writes ``last.ckpt`` at that step and ``psdclip.training`` exits.

SLURM's warning signal (``#SBATCH --signal=SIGUSR1@90 --requeue``) stops the run the same way, and then rank 0 requeues
the job (``scontrol requeue``); the requeued job finds the checkpoint through ``record_slurm_run`` and
``slurm_requeue_checkpoint`` (``psdclip.run.checkpoint_files.resolve_ckpt_path``), with no ``ckpt_path`` given.
"""

import logging
import signal
import threading

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from psdclip.run.stopping import StopRequested

log = logging.getLogger(__name__)


class StopOnSignal(L.Callback):
    """Notes SIGTERM, and SLURM's ``requeue_signal`` in SLURM jobs, and stops every rank after the same training step.

    Args:
        requeue_signal: the signal SLURM sends before it ends the job (``--signal=<name>@<seconds>``); null: leave it
            to Lightning, whose handler writes its own ``hpc_ckpt_*.ckpt`` beside the run instead of ``last.ckpt``.
    """

    def __init__(self, requeue_signal: str | None = "SIGUSR1"):
        self.requeue_signal = signal.Signals[requeue_signal] if requeue_signal else None
        self.received: list[int] = []  # signal numbers, in arrival order (this rank's)

    def note(self, signum: int, frame) -> None:
        # a signal handler may run between any two bytecodes of the training step: it only takes note
        if not self.received:
            log.info("received %s; stopping after the current step", signal.Signals(signum).name)
        self.received.append(signum)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # installed before Lightning registers its handlers (after setup), which then leaves this signal alone and
        # writes no hpc checkpoint of its own
        if self.requeue_signal is not None and SLURMEnvironment.detect() and in_main_thread():
            signal.signal(self.requeue_signal, self.note)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning has just registered its SIGTERM handler, the one that broadcasts; it restores the previous handler
        # when fit ends
        if in_main_thread():
            signal.signal(signal.SIGTERM, self.note)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if (stop := self.agreed_stop(trainer)) is not None:
            raise stop

    def agreed_stop(self, trainer: L.Trainer) -> StopRequested | None:
        """The stop every rank agrees on: whether any rank received SIGTERM, and whether any received the requeue
        signal (a collective under DDP: every rank calls it after the same step)."""
        flags = torch.tensor(self.flags(), dtype=torch.int32, device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return self.stop_for(*(bool(flag) for flag in flags.tolist()))

    def local_stop(self) -> StopRequested | None:
        """The stop this rank was signalled, without asking the others (where no common step boundary comes)."""
        return self.stop_for(*self.flags())

    def flags(self) -> tuple[bool, bool]:
        """(SIGTERM received, requeue signal received) on this rank."""
        return signal.SIGTERM in self.received, self.requeue_signal is not None and self.requeue_signal in self.received

    def stop_for(self, term: bool, requeue: bool) -> StopRequested | None:
        if requeue:  # the job is being pre-empted: requeue it, even when SIGTERM follows the warning
            return StopRequested(self.requeue_signal, requeue=True)
        return StopRequested(signal.SIGTERM, requeue=False) if term else None


def in_main_thread() -> bool:
    """Signal handlers can only be set there (a trainer run from another thread keeps Lightning's)."""
    return threading.current_thread() is threading.main_thread()
