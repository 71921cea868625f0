"""Stopping a job that a scheduler cancels or pre-empts: every rank stops after the same step, with one checkpoint.

A scheduler signals every rank of a job, each at its own moment: one rank may get the signal in the middle of a step
that another has finished. Lightning's SIGTERM handler broadcasts from inside the signal handler, a collective that
each rank enters wherever its signal happens to land; under DDP the ranks then wait for each other in different
collectives and the job hangs. ``StopOnSignal`` instead notes the signal and lets the ranks agree at the end of each
training step, in one all-reduce that every rank enters at the same point; then every rank raises ``StopRequested``,
``ResumableCheckpoint`` writes ``last.ckpt`` at that step and ``psdclip.training`` exits.

SLURM's warning signal (``#SBATCH --signal=SIGUSR1@90 --requeue``) stops the run the same way, and then rank 0 requeues
the job (``scontrol requeue``); the requeued job finds the checkpoint through ``record_slurm_run`` and
``slurm_requeue_checkpoint`` (``psdclip.callbacks.checkpointing.resolve_ckpt_path``), with no ``ckpt_path`` given.
"""

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class StopRequested(SIGTERMException):
    """Raised on every rank at the same step boundary once any rank has received ``signum``; ``requeue``: the
    signal was SLURM's warning, and the job should be requeued after the checkpoint."""

    def __init__(self, signum: int, requeue: bool):
        super().__init__(128 + signum)
        self.signum, self.requeue = signum, requeue

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


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


def signalled_stop(trainer: L.Trainer) -> SIGTERMException | None:
    """The stop this rank was signalled: noted by ``StopOnSignal``, or by Lightning's handler where it is absent."""
    for callback in trainer.callbacks:
        if isinstance(callback, StopOnSignal) and (stop := callback.local_stop()) is not None:
            return stop
    return SIGTERMException() if trainer.received_sigterm else None


def slurm_job_id() -> str | None:
    """The SLURM job's id as ``scontrol`` takes it (``<array job>_<task>`` for array tasks); None outside SLURM."""
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> str:
    """Ask SLURM to requeue this job (``scontrol requeue <id>``); what happened, in words."""
    job = slurm_job_id()
    if job is None:
        return "not a SLURM job, so not requeued"
    try:
        done = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exn:
        return f"requeueing SLURM job {job} failed ({exn!r}); resubmit it"
    if done.returncode != 0:
        return f"`scontrol requeue {job}` failed ({done.stderr.strip() or done.returncode}); resubmit the job"
    return f"requeued SLURM job {job}; it resumes from this checkpoint by itself"


def slurm_runs_file(log_dir: str, task_name: str) -> Path | None:
    """The file listing the run folders of this SLURM job, one per start (None outside SLURM)."""
    job = slurm_job_id()
    return Path(log_dir, task_name, "slurm_jobs", f"{job}.runs") if job else None


def record_slurm_run(log_dir: str, task_name: str, run_folder: str) -> None:
    """Note this start's run folder under the job's id, where a requeued start of the same job looks (rank 0)."""
    if (runs := slurm_runs_file(log_dir, task_name)) is not None:
        runs.parent.mkdir(parents=True, exist_ok=True)
        with runs.open("a") as file:
            file.write(f"{Path(run_folder).resolve()}\n")


def slurm_requeued_run_folders(log_dir: str, task_name: str) -> list[Path]:
    """The run folders earlier starts of this job wrote, where this start is a requeued one (``SLURM_RESTART_COUNT``
    > 0); else none."""
    runs = slurm_runs_file(log_dir, task_name)
    if runs is None or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1 or not runs.is_file():
        return []
    return [Path(line) for line in runs.read_text().splitlines() if line.strip()]
