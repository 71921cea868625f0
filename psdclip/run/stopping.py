"""Stopping and requeueing a job: the stop every rank agrees on (``StopRequested``), what this rank was signalled,
and SLURM's requeue with the run folders a requeued job resumes from. The callback that notes the signals and makes
the ranks agree is ``psdclip.callbacks.stopping.StopOnSignal``."""

import os
import signal
import subprocess
from pathlib import Path
from typing import Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


@runtime_checkable
class NotesSignals(Protocol):
    """A callback that notes stop signals itself (``StopOnSignal``)."""

    def local_stop(self) -> SIGTERMException | None: ...


class StopRequested(SIGTERMException):
    """Raised on every rank at the same step boundary once any rank has received ``signum``; ``requeue``: the
    signal was SLURM's warning, and the job should be requeued after the checkpoint."""

    def __init__(self, signum: int, requeue: bool):
        super().__init__(128 + signum)
        self.signum, self.requeue = signum, requeue

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def signalled_stop(trainer: L.Trainer) -> SIGTERMException | None:
    """The stop this rank was signalled: noted by a callback that notes signals (``StopOnSignal``), or by
    Lightning's handler where there is none."""
    for callback in trainer.callbacks:
        if isinstance(callback, NotesSignals) and (stop := callback.local_stop()) is not None:
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
