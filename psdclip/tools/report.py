"""Tabulate and plot a Hydra multirun: ``python -m psdclip.tools.report <multirun dir> [--metric M] [--columns PATTERN ...]``.

Each job folder holds ``.hydra/overrides.yaml`` (what the sweeper chose) and ``summary.json`` (what the
run measured). Writes ``report.csv``, ``report.md`` and ``report.png`` (the metric against each swept value) into the
multirun folder, or ``--out``. The table holds every evaluated set, the held-out one the sweep chose on
(``optimized_metric``) and the test sets alike; the report says which metric chose and the best job's test figure.
"""

import argparse
import fnmatch
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from psdclip.run.summary import SUMMARY_FILE, find_summary

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from psdclip.run.tables import markdown_table

log = logging.getLogger(__name__)

DEFAULT_COLUMNS = ("eval/*",)


@dataclass
class Job:
    directory: Path
    overrides: dict[str, object]
    summary: dict

    @property
    def metrics(self) -> dict[str, float]:
        return self.summary.get("metrics", {})


def parse_overrides(lines: list[str]) -> dict[str, object]:
    """Hydra override strings (``key=value``, ``+key=value``) as {key: typed value}; deletions are left out."""
    parsed = OverridesParser.create().parse_overrides(lines)
    return {o.key_or_group: o.value() for o in parsed if not o.is_delete()}


def load_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every finished job of a multirun folder, in job-number order; unfinished jobs are reported and left out."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"multirun folder not found: {sweep_dir}")
    files = sorted(
        sweep_dir.glob("*/.hydra/overrides.yaml"),
        key=lambda p: (
            not p.parent.parent.name.isdigit(),
            int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
            p.parent.parent.name,
        ),
    )
    if not files:
        raise FileNotFoundError(
            f"{sweep_dir} holds no Hydra jobs (no */.hydra/overrides.yaml); pass the folder of a `-m` run"
        )
    jobs, missing = [], []
    for overrides_file in files:
        folder = overrides_file.parent.parent
        summary = find_summary(folder)
        if summary is None:
            missing.append(folder.name)
            continue
        jobs.append(
            Job(
                folder,
                parse_overrides(yaml.safe_load(overrides_file.read_text()) or []),
                json.loads(summary.read_text()),
            )
        )
    if missing:
        log.warning(
            "%d job(s) without %s (failed or unfinished), left out: %s", len(missing), SUMMARY_FILE, ", ".join(missing)
        )
    if not jobs:
        raise FileNotFoundError(f"no job under {sweep_dir} finished (none has {SUMMARY_FILE})")
    return jobs


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs, in first-seen order."""
    keys = list(dict.fromkeys(key for job in jobs for key in job.overrides))
    return [key for key in keys if len({repr(job.overrides.get(key)) for job in jobs}) > 1]


def select_metrics(jobs: list[Job], patterns: list[str]) -> list[str]:
    names = sorted({name for job in jobs for name in job.metrics})
    return [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]


def sweep_metric(jobs: list[Job]) -> str | None:
    """The ``optimized_metric`` of the sweep's first job (from its saved ``.hydra/config.yaml``), when set."""
    config = jobs[0].directory / ".hydra" / "config.yaml"
    return (yaml.safe_load(config.read_text()) or {}).get("optimized_metric") if config.is_file() else None


def table(jobs: list[Job], keys: list[str], metrics: list[str]) -> pd.DataFrame:
    rows = [
        {
            "job": job.directory.name,
            **{key: job.overrides.get(key) for key in keys},
            **{metric: job.metrics.get(metric, math.nan) for metric in metrics},
            "wall_time_s": job.summary.get("wall_time_s"),
            "steps": job.summary.get("steps"),
        }
        for job in jobs
    ]
    return pd.DataFrame(rows)


def choice(frame: pd.DataFrame, jobs: list[Job], keys: list[str], metric: str) -> str:
    """Which metric chose and the job it chose (the highest), with that job's test headline (its summary's
    ``zeroshot_top1``, the first evaluated set): what a paper would report for the sweep."""
    best = int(frame[metric].idxmax())
    job = jobs[best]
    settings = ", ".join(f"{key}={job.overrides.get(key)}" for key in keys) or "no swept setting"
    headline = job.summary.get("zeroshot_top1")
    test = f"{headline:.4f}" if isinstance(headline, float) else "not measured"
    return (
        f"Chosen on {metric} (held-out data): job {job.directory.name} ({settings}) with {frame.at[best, metric]:.4f}; "
        f"its test zero-shot top-1 {test}."
    )


def markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    return markdown_table(list(frame.columns), frame.itertuples(index=False), digits)


def plot_sweep(frame: pd.DataFrame, keys: list[str], metric: str, path: Path) -> None:
    """One panel per swept key: every job as a dot, the mean (± std over the other keys) as a line."""
    figure, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for axis, key in zip(axes[0], keys):
        values = frame[key]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        order = sorted(values.unique(), key=lambda v: v if numeric else str(v))
        position = {value: (value if numeric else index) for index, value in enumerate(order)}
        x = values.map(position).astype(float)
        axis.scatter(x, frame[metric], alpha=0.5, s=18)
        grouped = frame.groupby(x)[metric]
        axis.errorbar(grouped.mean().index, grouped.mean(), yerr=grouped.std().fillna(0.0), marker="o", capsize=3)
        if not numeric:
            axis.set_xticks(range(len(order)), [str(v) for v in order], rotation=30)
        axis.set(xlabel=key, ylabel=metric)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{metric} over {len(frame)} runs", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(
    sweep_dir: str | Path,
    metric: str | None = None,
    columns: list[str] = DEFAULT_COLUMNS,
    out: str | Path | None = None,
) -> dict[str, Path]:
    """Write the multirun's table (CSV, Markdown) and plot; returns their paths."""
    sweep_dir = Path(sweep_dir)
    jobs = load_jobs(sweep_dir)
    keys = swept_keys(jobs)
    metric = metric or sweep_metric(jobs) or next(iter(select_metrics(jobs, list(columns))), None)
    if metric is None or not any(metric in job.metrics for job in jobs):
        known = sorted({name for job in jobs for name in job.metrics})
        raise ValueError(f"metric {metric!r} was not measured by any job; measured: {known}")
    metrics = list(dict.fromkeys([metric, *select_metrics(jobs, list(columns))]))
    frame = table(jobs, keys, metrics)
    out = Path(out) if out else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "report.csv", "markdown": out / "report.md"}
    frame.to_csv(paths["csv"], index=False)
    verdict = choice(frame, jobs, keys, metric)
    paths["markdown"].write_text(
        f"# {sweep_dir.name}: {len(jobs)} runs, swept {', '.join(keys) or 'nothing'}\n\n{verdict}\n\n{markdown(frame)}"
    )
    if keys:
        paths["plot"] = out / "report.png"
        plot_sweep(frame, keys, metric, paths["plot"])
    else:
        log.warning("no override differs between the jobs: nothing to plot")
    print(f"{markdown(frame)}\n\n{verdict}")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m psdclip.tools.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a Hydra multirun folder (logs/train/multiruns/<time>)")
    parser.add_argument("--metric", help="metric to plot (default: the sweep's optimized_metric)")
    parser.add_argument(
        "--columns",
        nargs="+",
        default=list(DEFAULT_COLUMNS),
        help="metrics to tabulate, glob patterns (default: eval/*)",
    )
    parser.add_argument("--out", help="output folder (default: the multirun folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for kind, path in report(args.sweep_dir, args.metric, args.columns, args.out).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
