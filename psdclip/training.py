"""Build everything from a composed config, train, evaluate, summarise."""

import logging
import re
import signal
import time
import traceback
from pathlib import Path
from typing import NoReturn

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from psdclip.cuda_settings import apply_cuda_settings
from psdclip.module import PSDCLIPModule
from psdclip.run.checkpoint_files import DiskFullError, resolve_ckpt_path
from psdclip.run.loggers import git_state
from psdclip.run.runlog import announce
from psdclip.run.stopping import StopRequested, record_slurm_run, requeue_slurm_job, signalled_stop
from psdclip.run.summary import write_summary

log = logging.getLogger(__name__)

# the shell's status for "ended by SIGTERM": schedulers and sweeps see a failed job, not a finished one
SIGTERM_EXIT = 128 + signal.SIGTERM
# where torch's collectives live (their innermost frame names the collective that failed)
COLLECTIVE_CODE = (Path(torch.distributed.__file__).parent, Path(torch.nn.parallel.__file__).parent)
# what gloo and NCCL say when a peer is gone or the group's timeout passes (some gloo messages do not name gloo)
PROCESS_GROUP_FAILURE = re.compile(
    r"\b(gloo|nccl)\b|pair closure|connection (reset|closed)|timed out waiting", re.IGNORECASE
)


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate each named entry of a callbacks/logger group (entries without ``_target_`` are skipped)."""
    objects = [
        instantiate(entry) for entry in (group or {}).values() if isinstance(entry, DictConfig) and "_target_" in entry
    ]
    return [obj for obj in objects if obj is not None]  # a factory may decline (e.g. no progress bar when disabled)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate as ``cfg`` says; returns the final metrics (``trainer.callback_metrics``).

    ``cfg`` must have passed ``psdclip.run.cli.check_settings``, as ``train.py`` does before it imports this module.
    """
    L.seed_everything(cfg.seed, workers=True)
    apply_cuda_settings(**cfg.get("cuda", {}))  # TF32, cuDNN autotuning (conf/train.yaml)
    clip = instantiate(cfg.model)
    # plain Python types in the hyperparameters, so checkpoints load with weights_only
    optim = instantiate(cfg.optim)
    module = PSDCLIPModule(
        clip,
        instantiate(cfg.loss),
        instantiate(cfg.teacher) if cfg.get("teacher") else None,
        optimizer=optim.optimizer,
        scheduler=optim.scheduler,
        micro_batches=optim.micro_batches,
    )
    datamodule = instantiate(cfg.data, transform=clip.train_transform, tokenizer=clip.tokenizer)
    loggers = instantiate_group(cfg.get("logger"))
    # max_steps > 0 ends the run by itself: Lightning would otherwise also stop at max_epochs, whichever comes first
    epochs = {"max_epochs": -1} if (cfg.trainer.get("max_steps") or -1) > 0 else {}
    trainer = instantiate(cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=loggers, **epochs)
    if trainer.is_global_zero:
        announce(f"run folder: {trainer.default_root_dir}")  # where to look while it runs, not only after
        # one line instead of Lightning's table, whose FLOPs column reads 0 for models it cannot trace
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in module.parameters())
        log.info(
            "model %s: %s trainable parameters, %s in all (an EMA teacher's, if any, included)",
            clip.name,
            f"{trainable:,}",
            f"{total:,}",
        )
    resolved = {**OmegaConf.to_container(cfg, resolve=True), "git": git_state()}
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name)
    if trainer.is_global_zero:  # noted after the look-up: a later, requeued start of this SLURM job looks here
        record_slurm_run(cfg.paths.log_dir, cfg.task_name, trainer.default_root_dir)
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)  # a checkpoint is data
    except SIGTERMException as stop:  # Lightning's or StopRequested: a SystemExit that would exit 0
        stopped_by_signal(trainer, stop)
    except RuntimeError as error:
        if (collective := failed_collective(error)) is None:
            raise
        lost_a_rank(trainer, collective, error)
    except DiskFullError as error:
        # stop rather than train on without a checkpoint to come back to; the message says where and what next
        log.error("stopped at step %d: %s", trainer.global_step, error.strerror)
        raise SystemExit(1) from None
    if (stop := signalled_stop(trainer)) is not None:  # during the end-of-training hooks, which no loop checks
        stopped_by_signal(trainer, stop)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        write_summary(cfg, trainer, metrics, time.perf_counter() - started)
    return metrics


def stopped_by_signal(trainer: L.Trainer, stop: SIGTERMException) -> NoReturn:
    """Say where the run stopped and how it resumes (requeueing a SLURM job on its warning signal), then exit with
    128 + the signal's number (``SIGTERM_EXIT`` for SIGTERM)."""
    signum = stop.signum if isinstance(stop, StopRequested) else signal.SIGTERM
    checkpoint = trainer.checkpoint_callback
    path = (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint else ""
    if not trainer.is_global_zero:
        log.info(
            "rank %d stopped by %s at step %d", trainer.global_rank, signal.Signals(signum).name, trainer.global_step
        )
    elif not path:
        log.error("stopped by %s at step %d: no checkpoint was saved", signal.Signals(signum).name, trainer.global_step)
    else:
        resume = f"resume with the same overrides plus ckpt_path={path} (or ckpt_path=last)"
        requeued = requeue_slurm_job() if isinstance(stop, StopRequested) and stop.requeue else resume
        log.error(
            "stopped by %s at step %d: saved %s; %s", signal.Signals(signum).name, trainer.global_step, path, requeued
        )
    raise SystemExit(128 + signum)


def failed_collective(error: RuntimeError) -> str | None:
    """Where the process group failed, if ``error`` says it did (gloo and NCCL raise plain RuntimeErrors when a peer is
    gone or the group's timeout passes, torch its DistError kinds): the innermost torch collective on the stack, or
    DDP's gradient all-reduce where it struck in the backward pass. None for any other error, whose stack is shown."""
    if not (isinstance(error, torch.distributed.DistError) or PROCESS_GROUP_FAILURE.search(str(error))):
        return None
    frames = traceback.extract_tb(error.__traceback__)
    collectives = [
        frame.name for frame in frames if any(Path(frame.filename).is_relative_to(code) for code in COLLECTIVE_CODE)
    ]
    if collectives:
        return f"the collective {collectives[-1]}"
    backward = any(frame.name == "backward" for frame in frames)
    return "DDP's gradient all-reduce (backward pass)" if backward else "a collective"


def lost_a_rank(trainer: L.Trainer, collective: str, error: RuntimeError) -> NoReturn:
    """One line instead of the collective's stack, then exit 1: every surviving rank ends the same way."""
    reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    log.error(
        "rank %d: %s failed after step %d, likely a lost rank (a process or node died, or hung past "
        "trainer.strategy.timeout): %s; resume with the same overrides plus ckpt_path=last",
        trainer.global_rank,
        collective,
        trainer.global_step,
        reason,
    )
    raise SystemExit(1)
