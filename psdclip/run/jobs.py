"""How the jobs of a sweep (``python train.py -m ...``) run: each job on its own ranks, its failure its own.

Hydra's basic launcher runs the jobs one after another in the sweep's process. Lightning would start a job's DDP ranks
> 0 by running the sweep's command line again (the whole sweep, ``-m`` included), its watchdog would kill the process
that started them (the sweep) when one of them fails, and the process group and ``LOCAL_RANK`` it leaves behind would
carry over to the next job. So each job runs as ``train.py`` with the job's own overrides, in the job's folder, as if
typed by hand, in a process group of its own: Lightning starts the job's ranks from there, and once the job has ended
whatever is left of it is killed.

hydra-submitit-launcher (``hydra/launcher=submitit_slurm`` or ``submitit_local``) runs each job as a SLURM job (or as
local processes) with one task per rank: each task becomes one DDP rank, told its place by submitit's job environment
(under SLURM, Lightning's SLURM environment reads the same place), and Lightning starts no processes.

A job that fails ends on every rank and is noted in its folder (``failure.json``: ``exit status 1`` when rank 0 ends
it, ``killed by SIGKILL`` when Lightning's watchdog saw a failed rank first); it returns None to the sweeper, so
the sweep goes on (Optuna marks the trial failed) and the multirun summary lists it. A job stopped by a signal is not a
failure: the sweep stops with it, or, in a SLURM job, psdclip requeues it (``psdclip.callbacks.stopping``).

This module imports neither torch nor Lightning: the sweep's process only starts jobs and waits for them.
"""

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from psdclip.run.cli import own_error, sweep_objective
from psdclip.run.runlog import announce
from psdclip.run.summary import SUMMARY_FILE

log = logging.getLogger(__name__)

# the sweep job a process runs (JSON [W&B group, run name]), for the job's own process and the ranks it starts
SWEEP_JOB = "PSDCLIP_SWEEP_JOB"
FAILURE_FILE = "failure.json"
SUBMITIT_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.BaseSubmititLauncher"
# what stops a sweep (Ctrl-C, a closed terminal, kill): a job in a process group of its own hears them only from the
# sweep, and then stops as any run does (SIGTERM: after the same step on every rank, with last.ckpt)
PASSED_ON_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# conf/hydra/launcher/submitit_*.yaml are psdclip's settings on top of the plugin's configs of the same name, which
# Hydra 1.3 still merges them onto (its "automatic schema matching") but warns about at every composition
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_\w+' is validated against ConfigStore schema")


def hydra_job() -> tuple[str | None, str | None]:
    """(sweep group, run name) of the Hydra job this process runs: the group names the multirun folder, the name the
    job's overrides (or its number); no group outside a sweep."""
    if (job := os.environ.get(SWEEP_JOB)) is not None:
        group, name = json.loads(job)
        return group, name
    if not HydraConfig.initialized():
        return None, None
    hydra = HydraConfig.get()
    name = hydra.job.override_dirname or None
    if hydra.mode != RunMode.MULTIRUN:
        return None, name
    return f"{hydra.job.name}-{Path(hydra.sweep.dir).name}", name or f"job{hydra.job.num}"


def run_sweep_job(cfg: DictConfig, entry_point: str) -> float | None:
    """Run the current job of a sweep, started by ``entry_point``: its ``optimized_metric``, None when it failed."""
    hydra = HydraConfig.get()
    # both looked up now: Hydra executes its plugins' modules anew when it scans them, making new classes
    if issubclass(get_class(hydra.launcher._target_), get_class(SUBMITIT_LAUNCHER)):
        return train_as_task_rank(cfg)
    return train_in_own_process(cfg, entry_point)


def train_in_own_process(cfg: DictConfig, entry_point: str) -> float | None:
    """The job as ``entry_point`` with its overrides, in its folder and a process group of its own (see above)."""
    hydra = HydraConfig.get()
    command = [sys.executable, entry_point, *single_run_overrides()]
    job = subprocess.Popen(command, env={**os.environ, SWEEP_JOB: json.dumps(hydra_job())}, process_group=0)
    try:
        with signals_passed_on(job.pid) as received:
            status = job.wait()
    finally:
        # ranks still tearing down, or one waiting in a collective for a rank that failed
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    if received:
        raise SystemExit(128 + received[0])
    if status != 0:
        record_failure(f"killed by {signal.Signals(-status).name}" if status < 0 else f"exit status {status}")
        return None
    summary = json.loads(Path(hydra.runtime.output_dir, SUMMARY_FILE).read_text())
    return sweep_objective(cfg, summary["metrics"], sweeping=True)


def single_run_overrides() -> list[str]:
    """The command-line overrides that make the current sweep job a single run with the same config, in the job's
    folder (which the sweep has already given the job's ``.hydra`` files)."""
    hydra = HydraConfig.get()
    given = OmegaConf.to_container(hydra.overrides, resolve=False)  # as typed: interpolations resolve in the job
    settings = [override for override in given["hydra"] if not override.startswith("hydra.mode=")]
    return [
        *settings,
        *given["task"],
        f'hydra.run.dir="{hydra.runtime.output_dir}"',
        "hydra.output_subdir=null",
        f"hydra.job.num={hydra.job.num}",
    ]


@contextlib.contextmanager
def signals_passed_on(process_group: int) -> Iterator[list[int]]:
    """Within the block, ``PASSED_ON_SIGNALS`` go on to ``process_group`` too; yields the signals received so far."""
    received: list[int] = []

    def pass_on(signum: int, frame) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process_group, signum)

    previous = {signum: signal.signal(signum, pass_on) for signum in PASSED_ON_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def train_as_task_rank(cfg: DictConfig) -> float | None:
    """The job on this submitit task as one of its DDP ranks; a failure is this rank's alone to note, and the others
    fail in their next collective."""
    rank = join_as_rank()
    from psdclip.training import train  # torch and Lightning, only where a job trains

    try:
        metrics = train(cfg)
    except SystemExit as stop:
        if stopped_by_signal(stop):  # pre-empted or cancelled: not the job's failure; requeued under SLURM
            raise
        record_failure(f"exit status {stop.code}", rank)  # the run has said why
        return None
    except Exception as error:
        if own_error(error) is None:  # not a configuration or data error: its stack is worth seeing
            log.exception("rank %d:", rank)
        record_failure(f"{type(error).__name__}: {error}", rank)
        return None
    return sweep_objective(cfg, metrics, sweeping=True)


def join_as_rank() -> int:
    """Export this submitit task's place in its job as torch's ``env://`` variables (``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): Lightning then takes the task for one rank
    started by a launcher, and starts none itself; under SLURM its SLURM environment reads the same. The rank."""
    import submitit  # only a task needs it

    place = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    os.environ["NODE_RANK"] = str(submitit.JobEnvironment().node)
    return place.rank


def stopped_by_signal(stop: SystemExit) -> bool:
    """Whether a run exited as psdclip does when a signal stops it: with 128 + the signal's number."""
    return isinstance(stop.code, int) and stop.code > 128


def record_failure(reason: str, rank: int | None = None) -> None:
    """Say that the current sweep job failed and why (``rank``: the rank that says it, None: the sweep's process);
    rank 0 or the sweep's process notes it in the job's folder, for the multirun summary."""
    hydra = HydraConfig.get()
    on_rank = "" if rank is None else f" on rank {rank}"
    announce(f"error: sweep job {hydra.job.num} failed{on_rank}: {reason} ({hydra.runtime.output_dir})", error=True)
    if not rank:
        record = {
            "status": "failed",
            "error": reason,
            "overrides": list(hydra.overrides.task),
            "output_dir": hydra.runtime.output_dir,
        }
        Path(hydra.runtime.output_dir, FAILURE_FILE).write_text(json.dumps(record, indent=1))
