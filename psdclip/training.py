"""Build everything from a composed config, train, evaluate, summarise."""

import json
import logging
import signal
import time
from pathlib import Path
from typing import NoReturn

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from psdclip.callbacks.checkpointing import resolve_ckpt_path
from psdclip.callbacks.summary import SUMMARY_FILE, format_table
from psdclip.cli import check_settings
from psdclip.cuda_settings import apply_cuda_settings
from psdclip.loggers import git_state
from psdclip.module import PSDCLIPModule
from psdclip.runlog import announce

log = logging.getLogger(__name__)

# the shell's status for "ended by SIGTERM": schedulers and sweeps see a failed job, not a finished one
SIGTERM_EXIT = 128 + signal.SIGTERM


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate each named entry of a callbacks/logger group (entries without ``_target_`` are skipped)."""
    objects = [
        instantiate(entry) for entry in (group or {}).values() if isinstance(entry, DictConfig) and "_target_" in entry
    ]
    return [obj for obj in objects if obj is not None]  # a factory may decline (e.g. no progress bar when disabled)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate as ``cfg`` says; returns the final metrics (``trainer.callback_metrics``)."""
    check_settings(cfg)
    L.seed_everything(cfg.seed, workers=True)
    apply_cuda_settings(**cfg.get("cuda", {}))  # TF32, cuDNN autotuning (conf/train.yaml)
    clip = instantiate(cfg.model)
    # plain Python types in the hyperparameters, so checkpoints load with weights_only
    module = PSDCLIPModule(clip, instantiate(cfg.loss), **instantiate(cfg.optim))
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
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning's: a SystemExit that would exit 0
        stopped_by_sigterm(trainer)
    if trainer.received_sigterm:  # during the end-of-training hooks, which no loop checks
        stopped_by_sigterm(trainer)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        write_summary(cfg, trainer, metrics, time.perf_counter() - started)
    return metrics


def stopped_by_sigterm(trainer: L.Trainer) -> NoReturn:
    """Say where the run stopped and how to resume it, then exit with ``SIGTERM_EXIT``."""
    checkpoint = trainer.checkpoint_callback
    path = (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint else ""
    if trainer.is_global_zero:
        resume = (
            f"saved {path}; resume with the same overrides plus ckpt_path={path} (or ckpt_path=last)"
            if path
            else "no checkpoint was saved"
        )
        log.error("stopped by SIGTERM at step %d: %s", trainer.global_step, resume)
    raise SystemExit(SIGTERM_EXIT)


def write_summary(cfg: DictConfig, trainer: L.Trainer, metrics: dict[str, float], wall_time: float) -> dict:
    zeroshot = {name.split("/")[1]: value for name, value in metrics.items() if name.endswith("/zeroshot_top1")}
    # the headline is the end-of-training evaluation's, not that of a learning curve evaluated beside it
    evaluated = [name for name in (cfg.get("evaluation") or {}).get("datasets", {}) if name in zeroshot]
    summary = {
        "method": "psd" if cfg.loss.alpha_max > 0 else "clip",
        "alpha_max": cfg.loss.alpha_max,
        "subset": cfg.loss.subset,
        "teacher": cfg.loss.teacher,
        "noise": cfg.data.get("noise"),
        "noise_kind": cfg.data.get("noise_kind"),
        "zeroshot_top1": zeroshot[evaluated[0]] if evaluated else next(iter(zeroshot.values()), None),
        "wall_time_s": round(wall_time, 1),
        "steps": trainer.global_step,
        "metrics": metrics,
        "output_dir": str(Path(trainer.default_root_dir)),
    }
    path = Path(trainer.default_root_dir, SUMMARY_FILE)  # the run folder's top, beside eval_results.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    announce(f"\n{format_table([summary])}\nsummary: {path}")
    return summary
