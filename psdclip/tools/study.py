"""The noisy-caption study: CLIP and PSD trained on the embedded data at several caption-noise levels, kinds and seeds.

    python -m psdclip.tools.study [dataset=embedded|embedded_mosaic] [noise=[0,0.2,0.4,0.6]] [kinds=[flip,swap]]
        [seeds=3] [first_seed=0] [methods=[clip,psd]] [split=test] [metrics=[PATTERNS]] [out=DIR] [quick=true]
        [+train.<train.py key>=<value> ...]

Settings: ``conf/study.yaml``. Runs ``train.py -m experiment=noisy_captions loss=… data.noise=… data.noise_kind=…
seed=…`` (Hydra multiruns, jobs in sequence; clean data once, not once per kind), with every ``+train.KEY=VALUE`` as
the override ``KEY=VALUE``, then writes into the study folder ``study.csv`` (every run), ``study.md`` (mean ± std over
seeds: kind × noise × method, with PSD − CLIP) and ``study.png`` (each metric against noise, one panel per kind, one
line per method). Besides the final metrics it reports each run's best value over its learning curve (the experiment
evaluates every few epochs), so memorisation of wrong captions shows as the gap. ``dataset=embedded_mosaic`` runs the
same on the mosaics (``experiment=noisy_captions_mosaic``), with retrieval as the headline metric and the learning
curve, and the noise kinds partial and swap by default.

Choose settings with ``split=val`` (held-out training images) and other seeds (``first_seed=100``); report with
``split=test`` and the seeds 0, 1, 2. ``summarise=true out=DIR`` trains nothing and tabulates every sweep folder under
DIR (e.g. one ``train.py -m … hydra.sweep.dir=DIR/<name>`` per seed, run side by side).
"""

import logging
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import matplotlib
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from psdclip.module import DIAGNOSTICS as D_DIAGNOSTICS
from psdclip.tools.report import load_jobs, markdown, select_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt

log = logging.getLogger(__name__)

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "train.py"


@dataclass(frozen=True)
class StudyData:
    """What the study runs on one training data option: its recipe, the evaluation set whose split it chooses, the
    metric of the learning curve, and the defaults of ``kinds=`` and ``metrics=`` (metrics='eval/*' tabulates
    everything the runs measured)."""

    experiment: str
    eval_set: str
    curve_metric: str
    kinds: list[str]
    metrics: list[str]


# D's precision and recall against the data's marks, and the memory rule's noise estimate (the names the module logs)
DIAGNOSTICS = [name for name in D_DIAGNOSTICS if "distill" in name] + ["train/noise_estimate"]
STUDY_DATA = {
    # each task's headline metric
    "embedded": StudyData(
        "noisy_captions",
        "fashion_mnist",
        "eval/fashion_mnist_val/zeroshot_top1",
        ["flip", "swap"],
        ["eval/*/zeroshot_top1", "eval/*/linear_probe_top1", "eval/*/retrieval_mean_recall", *DIAGNOSTICS],
    ),
    # retrieval first: on mosaics it is instance-level, the task the mosaics exist for
    "embedded_mosaic": StudyData(
        "noisy_captions_mosaic",
        "fashion_mosaic",
        "eval/fashion_mosaic_val/retrieval_mean_recall",
        ["partial", "swap"],
        ["eval/*/retrieval_mean_recall", "eval/*/retrieval_r1", "eval/*/zeroshot_top1", *DIAGNOSTICS],
    ),
}
# a few steps on tiny batches: checks the whole pipeline in seconds (tests, smoke runs)
QUICK = ["debug=tiny", "data.train_size=null", "callbacks.learning_curve.every_n_epochs=1"]
# a string the override grammar reads back as that same string without quotes
PLAIN_STRING = re.compile(r"(?!(true|false|null|nan|inf)$)[A-Za-z_/~][\w./~-]*")


def check(cfg: DictConfig) -> StudyData:
    """The settings' errors as clear messages (before any training starts); the study data they pick."""
    if cfg.dataset not in STUDY_DATA:
        raise ValueError(f"dataset must be one of {', '.join(STUDY_DATA)}, got {cfg.dataset!r}")
    for key, least in (("seeds", 1), ("first_seed", 0)):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < least:
            raise ValueError(f"{key} must be a whole number >= {least}, got {cfg[key]!r}")
    if cfg.split not in ("test", "val"):
        raise ValueError(f"split must be test or val, got {cfg.split!r}")
    for key in ("noise", "methods") + (("kinds",) if cfg.kinds is not None else ()):
        if not OmegaConf.is_list(cfg[key]) or not len(cfg[key]):
            raise ValueError(f"{key} must be a non-empty list, e.g. {key}=[{'0,0.4' if key == 'noise' else 'a,b'}]")
    return STUDY_DATA[cfg.dataset]


def override_value(value) -> str:
    """``value`` written as the override grammar reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return f"[{','.join(override_value(item) for item in value)}]"
    if isinstance(value, str) and not PLAIN_STRING.fullmatch(value):
        return "'" + value.replace("'", "\\'") + "'"
    return str(value)


def train_overrides(train: dict, prefix: str = "") -> list[str]:
    """The nested ``+train.KEY=VALUE`` settings as flat ``KEY=VALUE`` overrides of train.py."""
    overrides = []
    for key, value in train.items():
        if isinstance(value, dict):
            overrides += train_overrides(value, f"{prefix}{key}.")
        else:
            overrides.append(f"{prefix}{key}={override_value(value)}")
    return overrides


def commands(cfg: DictConfig, study_dir: Path) -> list[list[str]]:
    """One multirun for clean data (if asked) and one for the noisy levels × kinds."""
    data = check(cfg)
    seeds = ",".join(str(seed) for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    clean, noisy = [lv for lv in cfg.noise if float(lv) == 0], [str(lv) for lv in cfg.noise if float(lv) != 0]
    base = [
        sys.executable,
        str(TRAIN_SCRIPT),
        "-m",
        f"experiment={data.experiment}",
        f"loss={','.join(cfg.methods)}",
        f"seed={seeds}",
        f"evaluation.datasets.{data.eval_set}.split={cfg.split}",
        *(QUICK if cfg.quick else []),
        *train_overrides(OmegaConf.to_container(cfg.train)),
    ]
    runs = []
    if clean:
        runs.append([*base, "data.noise=0", "data.noise_kind=flip", f"hydra.sweep.dir={study_dir / 'clean'}"])
    if noisy:
        runs.append(
            [
                *base,
                f"data.noise={','.join(noisy)}",
                f"data.noise_kind={','.join(cfg.kinds or data.kinds)}",
                f"hydra.sweep.dir={study_dir / 'noisy'}",
            ]
        )
    return runs


def best_on_curve(job_dir: Path, metric: str) -> float | None:
    """The best value of ``metric`` over the run's evaluations (its CSV log), the final one included."""
    values = [
        value
        for path in job_dir.glob("csv/metrics.csv")
        for value in pd.read_csv(path).get(metric, pd.Series()).dropna()
    ]
    return float(max(values)) if values else None


def runs_table(study_dir: Path, patterns: list[str], curve_metric: str) -> tuple[pd.DataFrame, list[str]]:
    jobs = []
    for sweep in sorted(folder for folder in study_dir.iterdir() if folder.is_dir() and list(folder.glob("*/.hydra"))):
        try:
            jobs += load_jobs(sweep)
        except FileNotFoundError as error:  # a sweep that has not finished a job yet: report the others
            log.warning("%s", error)
    if not jobs:
        raise FileNotFoundError(f"no study runs under {study_dir}")
    metrics = select_metrics(jobs, patterns)
    if not metrics:
        raise ValueError(f"no run measured a metric matching {patterns}")
    rows = []
    for job in jobs:
        noise = float(job.summary["noise"])
        row = {
            "method": job.overrides.get("loss", job.summary["method"]),
            "kind": job.summary.get("noise_kind") if noise else "clean",
            "noise": noise,
            "seed": job.overrides.get("seed"),
            **{metric: job.metrics.get(metric) for metric in metrics},
        }
        for metric in metrics:
            if metric.endswith(curve_metric):
                row[f"{metric}_best"] = best_on_curve(job.directory, metric)
        rows.append({**row, "wall_time_s": job.summary.get("wall_time_s")})
    frame = pd.DataFrame(rows)
    return frame, [*metrics, *[f"{m}_best" for m in metrics if m.endswith(curve_metric)]]


def aggregate(runs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per metric, kind and noise level: each method's mean ± std over seeds, and each method − CLIP."""
    kinds = sorted(runs["kind"].unique(), key=lambda k: (k != "clean", k))
    methods = sorted(runs["method"].unique(), key=lambda m: (m != "clip", m))
    grouped = runs.groupby(["kind", "noise", "method"])[metrics]
    mean, std, count = grouped.mean(), grouped.std(), grouped.count()
    rows = []
    for metric in metrics:
        for kind in kinds:
            for noise in sorted(runs.loc[runs["kind"] == kind, "noise"].unique()):
                row = {"metric": metric, "kind": kind, "noise": noise}
                for method in methods:
                    key = (kind, noise, method)
                    if key in mean.index and count.loc[key, metric]:
                        m, s, n = mean.loc[key, metric], std.loc[key, metric], count.loc[key, metric]
                        row[method] = f"{m:.4f} ± {s:.4f} (n={n})" if n > 1 else f"{m:.4f} (n=1)"
                for method in methods:
                    if method != "clip" and (kind, noise, "clip") in mean.index and (kind, noise, method) in mean.index:
                        row[f"{method} − clip"] = (
                            f"{mean.loc[(kind, noise, method), metric] - mean.loc[(kind, noise, 'clip'), metric]:+.4f}"
                        )
                rows.append(row)
    return pd.DataFrame(rows)


def plot(runs: pd.DataFrame, metrics: list[str], path: Path) -> None:
    """One row of panels per metric, one column per noise kind (clean data is each kind's noise-0 point)."""
    kinds = sorted(k for k in runs["kind"].unique() if k != "clean") or ["clean"]
    figure, axes = plt.subplots(len(metrics), len(kinds), figsize=(4.8 * len(kinds), 3.4 * len(metrics)), squeeze=False)
    for row, metric in enumerate(metrics):
        for column, kind in enumerate(kinds):
            axis = axes[row][column]
            data = runs[runs["kind"].isin([kind, "clean"])]
            for method, group in data.groupby("method"):
                stats = group.groupby("noise")[metric].agg(["mean", "std"]).dropna(subset=["mean"])
                axis.errorbar(
                    stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3, label=method
                )
            axis.set(xlabel=f"caption noise ({kind})", ylabel=metric.split("/")[-1])
            axis.set_title(metric, fontsize=8)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    seeds = runs.groupby(["method", "kind", "noise"]).size().max()
    figure.suptitle(f"CLIP vs PSD under caption noise (mean ± std over {seeds} seed(s))", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.97))  # leave room for the title
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summarise(study_dir: Path, patterns: list[str], curve_metric: str) -> dict[str, Path]:
    runs, metrics = runs_table(study_dir, patterns, curve_metric)
    paths = {"runs": study_dir / "study.csv", "table": study_dir / "study.md", "plot": study_dir / "study.png"}
    runs.to_csv(paths["runs"], index=False)
    table = markdown(aggregate(runs, metrics))
    paths["table"].write_text(f"# Noisy-caption study ({len(runs)} runs)\n\n{table}")
    plot(runs, metrics, paths["plot"])
    print(table)
    return paths


def run_study(cfg: DictConfig) -> dict[str, Path]:
    """Train the study's runs (unless ``summarise``), then tabulate and plot every run under ``out``."""
    data = check(cfg)
    study_dir = Path(cfg.out).resolve()
    started = time.perf_counter()
    for cmd in [] if cfg.summarise else commands(cfg, study_dir):
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
    log.info("study trainings took %.1f min", (time.perf_counter() - started) / 60)
    paths = summarise(study_dir, list(cfg.metrics or data.metrics), data.curve_metric)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return paths


@hydra.main(version_base="1.3", config_path="../../conf", config_name="study")
def main(cfg: DictConfig) -> None:
    run_study(cfg)


if __name__ == "__main__":
    main()
