"""The noisy-caption study: CLIP and PSD trained on the embedded data at several caption-noise levels, kinds and seeds.

    python -m psdclip.tools.study [data=embedded|embedded_mosaic] [noise=0,0.2,0.4,0.6] [kinds=flip,swap] [seeds=3]
        [first_seed=0] [methods=clip,psd] [split=test] [metrics=PATTERNS] [out=DIR] [--quick]
        [any train.py override, e.g. trainer.max_epochs=2]

Runs ``train.py -m experiment=noisy_captions loss=… data.noise=… data.noise_kind=… seed=…`` (Hydra multiruns, jobs
in sequence; clean data once, not once per kind), then writes into the study folder ``study.csv`` (every run),
``study.md`` (mean ± std over seeds: kind × noise × method, with PSD − CLIP) and ``study.png`` (each metric against
noise, one panel per kind, one line per method). Besides the final metrics it reports each run's best value over
its learning curve (the experiment evaluates every few epochs), so memorisation of wrong captions shows as the gap.
``data=embedded_mosaic`` runs the same on the mosaics (``experiment=noisy_captions_mosaic``), with retrieval as
the headline metric and the learning curve, and the noise kinds partial and swap by default.

Choose settings with ``split=val`` (held-out training images) and other seeds (``first_seed=100``); report with
``split=test`` and the seeds 0, 1, 2. ``--summarise out=DIR`` trains nothing and tabulates every sweep folder under DIR
(e.g. one ``train.py -m … hydra.sweep.dir=DIR/<name>`` per seed, run side by side).
"""

import argparse
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd

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
    kinds: str
    metrics: str


DIAGNOSTICS = "train/distill_precision_epoch,train/distill_recall_epoch"
STUDY_DATA = {
    # each task's headline metric
    "embedded": StudyData(
        "noisy_captions",
        "fashion_mnist",
        "eval/fashion_mnist_val/zeroshot_top1",
        "flip,swap",
        f"eval/*/zeroshot_top1,eval/*/linear_probe_top1,eval/*/retrieval_mean_recall,{DIAGNOSTICS}",
    ),
    # retrieval first: on mosaics it is instance-level, the task the mosaics exist for
    "embedded_mosaic": StudyData(
        "noisy_captions_mosaic",
        "fashion_mosaic",
        "eval/fashion_mosaic_val/retrieval_mean_recall",
        "partial,swap",
        f"eval/*/retrieval_mean_recall,eval/*/retrieval_r1,eval/*/zeroshot_top1,{DIAGNOSTICS}",
    ),
}
STUDY_KEYS = {
    "data": "embedded",
    "noise": "0,0.2,0.4,0.6",
    "kinds": None,
    "seeds": "3",
    "first_seed": "0",
    "methods": "clip,psd",
    "split": "test",
    "metrics": None,
    "out": None,
}
# a few steps on tiny batches: checks the whole pipeline in seconds (tests, smoke runs)
QUICK = ["debug=tiny", "data.train_size=null", "callbacks.learning_curve.every_n_epochs=1"]


def parse(argv: list[str]) -> tuple[dict, list[str], bool]:
    """Split ``key=value`` arguments into the study's settings and the overrides passed on to train.py."""
    parser = argparse.ArgumentParser(prog="python -m psdclip.tools.study", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few tiny steps per run (tests, smoke runs)")
    parser.add_argument(
        "--summarise",
        action="store_true",
        help="train nothing: tabulate and plot the runs already under out=DIR (e.g. sweeps run side by side into it)",
    )
    parser.add_argument(
        "settings",
        nargs="*",
        help="data=…, noise=…, kinds=…, seeds=N, first_seed=S, methods=…, "
        "split=test|val, metrics=…, out=DIR, and train.py overrides",
    )
    args = parser.parse_args(argv)
    settings, overrides = dict(STUDY_KEYS), []
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"expected key=value, got {item!r}")
        if key in settings:
            settings[key] = value
        else:
            overrides.append(item)
    for key in ("seeds", "first_seed"):
        if not settings[key].isdigit() or (key == "seeds" and int(settings[key]) < 1):
            parser.error(f"{key} must be a {'positive ' if key == 'seeds' else ''}whole number, got {settings[key]!r}")
    if settings["split"] not in ("test", "val"):
        parser.error(f"split must be test or val, got {settings['split']!r}")
    if settings["data"] not in STUDY_DATA:
        parser.error(f"data must be one of {', '.join(STUDY_DATA)}, got {settings['data']!r}")
    if args.summarise and not settings["out"]:
        parser.error("--summarise needs out=DIR, the study folder whose runs to summarise")
    settings["summarise"] = args.summarise
    data = STUDY_DATA[settings["data"]]
    settings["kinds"] = settings["kinds"] or data.kinds
    settings["metrics"] = settings["metrics"] or data.metrics
    return settings, overrides, args.quick


def commands(settings: dict, overrides: list[str], quick: bool, study_dir: Path) -> list[list[str]]:
    """One multirun for clean data (if asked) and one for the noisy levels × kinds."""
    first = int(settings["first_seed"])
    seeds = ",".join(str(seed) for seed in range(first, first + int(settings["seeds"])))
    levels = [level for level in settings["noise"].split(",") if level.strip()]
    clean, noisy = [lv for lv in levels if float(lv) == 0], [lv for lv in levels if float(lv) != 0]
    data = STUDY_DATA[settings["data"]]
    base = [
        sys.executable,
        str(TRAIN_SCRIPT),
        "-m",
        f"experiment={data.experiment}",
        f"loss={settings['methods']}",
        f"seed={seeds}",
        f"evaluation.datasets.{data.eval_set}.split={settings['split']}",
        *(QUICK if quick else []),
        *overrides,
    ]
    runs = []
    if clean:
        runs.append([*base, "data.noise=0", "data.noise_kind=flip", f"hydra.sweep.dir={study_dir / 'clean'}"])
    if noisy:
        runs.append(
            [
                *base,
                f"data.noise={','.join(noisy)}",
                f"data.noise_kind={settings['kinds']}",
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


def main(argv: list[str] | None = None) -> None:
    settings, overrides, quick = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    study_dir = Path(settings["out"] or f"logs/noisy_captions/study_{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    started = time.perf_counter()
    for cmd in [] if settings["summarise"] else commands(settings, overrides, quick, study_dir):
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
    log.info("study trainings took %.1f min", (time.perf_counter() - started) / 60)
    curve_metric = STUDY_DATA[settings["data"]].curve_metric
    for kind, path in summarise(study_dir, settings["metrics"].split(","), curve_metric).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
