"""The noisy-caption study: CLIP and PSD trained on the embedded data at several caption-noise levels and seeds.

    python -m psdclip.study noise=0,0.2,0.4,0.6 seeds=3 [methods=clip,psd] [metrics=PATTERNS] [out=DIR] [--quick]
        [any train.py override, e.g. trainer.max_epochs=2]

Runs ``train.py -m experiment=noisy_captions loss=… data.noise=… seed=…`` (one Hydra multirun, jobs in sequence),
then writes ``study.csv`` (every run), ``study.md`` (mean ± std over seeds, noise × method) and ``study.png`` (each
metric against noise, one line per method) into the multirun folder.
"""

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import pandas as pd

from psdclip.report import load_jobs, markdown, select_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

log = logging.getLogger(__name__)

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"
# the headline metric of each task by default; metrics='eval/*' tabulates everything the runs measured
HEADLINE_METRICS = "eval/*/zeroshot_top1,eval/*/linear_probe_top1,eval/*/retrieval_mean_recall"
STUDY_KEYS = {"noise": "0,0.2,0.4,0.6", "seeds": "3", "methods": "clip,psd", "metrics": HEADLINE_METRICS, "out": None}
# a few steps on tiny batches: checks the whole pipeline in seconds (tests, smoke runs)
QUICK = ["trainer.max_epochs=1", "trainer.max_steps=3", "data.batch_size=32", "data.num_workers=0", "optim.warmup_steps=1",
         "callbacks.media.every_n_steps=2", "callbacks.media.eval_samples.limit=50", "callbacks.throughput.window_size=2"]


def parse(argv: list[str]) -> tuple[dict, list[str], bool]:
    """Split ``key=value`` arguments into the study's settings and the overrides passed on to train.py."""
    parser = argparse.ArgumentParser(prog="python -m psdclip.study", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few tiny steps per run (tests, smoke runs)")
    parser.add_argument("settings", nargs="*", help="noise=…, seeds=N, methods=…, metrics=…, out=DIR, and train.py overrides")
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
    if not settings["seeds"].isdigit() or int(settings["seeds"]) < 1:
        parser.error(f"seeds must be a positive count, got {settings['seeds']!r}")
    return settings, overrides, args.quick


def command(settings: dict, overrides: list[str], quick: bool, sweep_dir: Path) -> list[str]:
    seeds = ",".join(str(seed) for seed in range(int(settings["seeds"])))
    return [sys.executable, str(TRAIN_SCRIPT), "-m", "experiment=noisy_captions", f"loss={settings['methods']}",
            f"data.noise={settings['noise']}", f"seed={seeds}", f"hydra.sweep.dir={sweep_dir}",
            *(QUICK if quick else []), *overrides]


def runs_table(sweep_dir: Path, patterns: list[str]) -> tuple[pd.DataFrame, list[str]]:
    jobs = load_jobs(sweep_dir)
    metrics = select_metrics(jobs, patterns)
    if not metrics:
        raise ValueError(f"no run measured a metric matching {patterns}")
    rows = [{"method": job.summary["method"], "noise": job.summary["noise"], "seed": job.overrides.get("seed"),
             **{metric: job.metrics.get(metric) for metric in metrics}, "wall_time_s": job.summary.get("wall_time_s")} for job in jobs]
    return pd.DataFrame(rows), metrics


def aggregate(runs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per metric and noise level: each method's mean ± std over seeds, and PSD − CLIP when both ran."""
    grouped = runs.groupby(["noise", "method"])[metrics]
    mean, std, count = grouped.mean(), grouped.std(), grouped.count()
    rows = []
    for metric in metrics:
        for noise in sorted(runs["noise"].unique()):
            row = {"metric": metric, "noise": noise}
            for method in sorted(runs["method"].unique()):
                if (noise, method) in mean.index:
                    m, s, n = mean.loc[(noise, method), metric], std.loc[(noise, method), metric], count.loc[(noise, method), metric]
                    row[method] = f"{m:.4f} ± {s:.4f} (n={n})" if n > 1 else f"{m:.4f} (n=1)"
            if {"clip", "psd"} <= set(runs["method"]) and (noise, "clip") in mean.index and (noise, "psd") in mean.index:
                row["psd − clip"] = f"{mean.loc[(noise, 'psd'), metric] - mean.loc[(noise, 'clip'), metric]:+.4f}"
            rows.append(row)
    return pd.DataFrame(rows)


def plot(runs: pd.DataFrame, metrics: list[str], path: Path) -> None:
    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    for axis, metric in zip(axes.flat, metrics):
        for method, group in runs.groupby("method"):
            stats = group.groupby("noise")[metric].agg(["mean", "std"])
            axis.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3, label=method.upper())
        axis.set(xlabel="caption noise (fraction of wrong captions)", ylabel=metric.split("/")[-1], title=metric)
        axis.title.set_fontsize(9)
        axis.grid(alpha=0.3)
        axis.legend()
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    seeds = runs.groupby(["method", "noise"]).size().max()
    figure.suptitle(f"CLIP vs PSD under caption noise (mean ± std over {seeds} seed(s))", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.95))  # leave room for the title
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summarise(sweep_dir: Path, patterns: list[str]) -> dict[str, Path]:
    runs, metrics = runs_table(sweep_dir, patterns)
    paths = {"runs": sweep_dir / "study.csv", "table": sweep_dir / "study.md", "plot": sweep_dir / "study.png"}
    runs.to_csv(paths["runs"], index=False)
    table = markdown(aggregate(runs, metrics))
    paths["table"].write_text(f"# Noisy-caption study ({len(runs)} runs)\n\n{table}")
    plot(runs, metrics, paths["plot"])
    print(table)
    return paths


def main(argv: list[str] | None = None) -> None:
    settings, overrides, quick = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sweep_dir = Path(settings["out"] or f"logs/noisy_captions/study_{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    cmd = command(settings, overrides, quick, sweep_dir)
    log.info("running %s", " ".join(cmd))
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    log.info("study trainings took %.1f min", (time.perf_counter() - started) / 60)
    for kind, path in summarise(sweep_dir, settings["metrics"].split(",")).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
