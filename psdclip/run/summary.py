"""The run summary: ``summary.json`` in each run folder (method, settings, the headline zero-shot top-1 on the first
evaluated set, the held-out metric a sweep chooses by, the noise estimate, wall time, every final metric), and the
one-line table printed after a run or a multirun."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from psdclip.run.runlog import announce
from psdclip.run.tables import text_table

if TYPE_CHECKING:  # the multirun callback imports this module at start-up, before torch and Lightning may load
    import lightning as L

SUMMARY_FILE = "summary.json"
COLUMNS = ("method", "alpha_max", "noise", "zeroshot_top1", "optimized", "wall_time_s")


def find_summary(job: Path) -> Path | None:
    """A job's summary: at its folder's top (a recipe's, over its stages'), or anywhere below it (older runs wrote
    ``checkpoints/summary.json``)."""
    preferred = job / SUMMARY_FILE
    return preferred if preferred.is_file() else next(iter(sorted(job.rglob(SUMMARY_FILE))), None)


def format_table(rows: list[dict]) -> str:
    """A plain-text table of run summaries, one row per run."""
    columns = [c for c in COLUMNS if any(c in row for row in rows)] + ["output_dir"]
    return text_table(columns, ([row.get(c) for c in columns] for row in rows))


def write_summary(cfg: DictConfig, trainer: "L.Trainer", metrics: dict[str, float], wall_time: float) -> dict:
    zeroshot = {name.split("/")[1]: value for name, value in metrics.items() if name.endswith("/zeroshot_top1")}
    # the headline is the end-of-training evaluation's, not that of a learning curve evaluated beside it
    evaluated = [name for name in (cfg.get("evaluation") or {}).get("datasets", {}) if name in zeroshot]
    summary = {
        "method": "psd" if cfg.loss.alpha_max > 0 else "clip",
        "alpha_max": cfg.loss.alpha_max,
        "subset": trainer.lightning_module.loss.subset.name,
        "teacher": getattr(trainer.lightning_module.teacher, "name", "self"),
        "noise": cfg.data.get("noise"),
        "noise_kind": cfg.data.get("noise_kind"),
        "zeroshot_top1": zeroshot[evaluated[0]] if evaluated else next(iter(zeroshot.values()), None),
        # what a sweep chooses by (held-out data): its name and this run's value
        "optimized_metric": cfg.get("optimized_metric"),
        "optimized": metrics.get(cfg.get("optimized_metric")),
        # the subset rule's estimate of the share of wrong captions in the training data (loss=psd_memory)
        "noise_estimate": metrics.get("train/noise_estimate"),
        "noise_estimate_se": metrics.get("train/noise_estimate_se"),
        "noise_estimate_range": [metrics.get("train/noise_estimate_low"), metrics.get("train/noise_estimate_high")],
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
