"""What the scaling study's rows answer (issue 43, item 4): tables and a plot from ``bench/scaling_study.py``'s rows.

    python -m bench.scaling_report DIR      # reads DIR/rows.csv; writes DIR/scaling.md and DIR/scaling.png

- **Gain against size:** each loss − CLIP in zero-shot and linear-probe top-1 on the test split, paired by seed (mean ±
  std over seeds), per caption noise and training size. Does PSD's gain grow with data, as the paper says?
- **The detector against size:** a ``loss=psd_memory`` run's remembered-gap ROC AUC for the wrong captions, its noise
  estimate's error, whether its range holds the truth, and its count of threshold pairs (issue 20's "needs scale").
- **Effective robustness** (Taori et al. 2020): zero-shot on the shifted test set beyond a linear fit in logit space
  over CLIP's runs (every size and noise), with ``psdclip.eval.robustness``.
- **Cost:** seconds per run (one GPU: GPU-seconds), training alone and with its evaluation.

Works on a partial grid (a lease cut short): each table has the cells measured so far.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from psdclip.eval.robustness import baseline_fit, baseline_prediction, effective_robustness
from psdclip.tools.report import markdown

CELL = ["kind", "noise", "size"]
TOP1 = {"zeroshot_test": "zero-shot", "linear_probe_test": "linear probe"}


def mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return ""
    return f"{values.mean():+.4f} ± {values.std():.4f}" if len(values) > 1 else f"{values.mean():+.4f} (n=1)"


def paired_gains(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per cell, loss other than CLIP and metric: the loss − CLIP top-1 per seed the two share."""
    wide = rows.pivot_table(index=[*CELL, "seed"], columns="loss", values=list(TOP1), aggfunc="first")
    gains = []
    for metric, name in TOP1.items():
        if (metric, "clip") not in wide:
            continue
        for loss in wide[metric].columns.drop("clip"):
            gain = (wide[(metric, loss)] - wide[(metric, "clip")]).dropna().rename("gain").reset_index()
            gains.append(gain.assign(loss=loss, metric=name))
    columns = [*CELL, "seed", "gain", "loss", "metric"]
    return pd.concat(gains, ignore_index=True) if gains else pd.DataFrame(columns=columns)


def gain_table(gains: pd.DataFrame) -> pd.DataFrame:
    grouped = gains.groupby(["metric", "loss", *CELL])["gain"]
    return grouped.agg(**{"− CLIP (mean ± std)": mean_std, "seeds": "count"}).reset_index()


def detector_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The ``loss=psd_memory`` runs' detector and noise estimate against the truth, per cell."""
    memory = rows[rows["loss"] == "psd_memory"].assign(
        error=lambda frame: frame["noise_estimate"] - frame["truth"],
        holds=lambda frame: (
            frame["noise_estimate_low"].le(frame["truth"]) & frame["truth"].le(frame["noise_estimate_high"])
        ),
        width=lambda frame: frame["noise_estimate_high"] - frame["noise_estimate_low"],
    )
    return (
        memory.groupby(CELL)
        .agg(
            auroc=("memory_auroc", "mean"),
            auroc_std=("memory_auroc", "std"),
            estimate_error=("error", "mean"),
            error_std=("error", "std"),
            range_width=("width", "mean"),
            range_holds=("holds", "sum"),
            runs=("holds", "count"),
            threshold_pairs=("threshold_pairs", "mean"),
        )
        .reset_index()
    )


def with_effective_robustness(rows: pd.DataFrame) -> tuple[pd.DataFrame, tuple[float, float] | None]:
    """The rows with each run's effective robustness against the fit over CLIP's runs; no fit (and no column) until
    CLIP has runs at two different clean accuracies."""
    clip = rows[rows["loss"] == "clip"].dropna(subset=["zeroshot_test", "zeroshot_shifted"])
    if clip["zeroshot_test"].nunique() < 2:
        return rows, None
    fit = baseline_fit(clip["zeroshot_test"].tolist(), clip["zeroshot_shifted"].tolist())
    robustness = [
        effective_robustness(clean, {"shifted": shifted}, *fit)["effective_robustness"]
        for clean, shifted in zip(rows["zeroshot_test"], rows["zeroshot_shifted"])
    ]
    return rows.assign(effective_robustness=robustness), fit


def cost_table(rows: pd.DataFrame) -> pd.DataFrame:
    return (
        rows.groupby(["size", "loss"])
        .agg(runs=("seconds", "count"), train_seconds=("train_seconds", "mean"), seconds=("seconds", "mean"))
        .reset_index()
    )


def plot(rows: pd.DataFrame, gains: pd.DataFrame, fit: tuple[float, float] | None, path: Path) -> None:
    figure, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    gain_axis, auroc_axis, error_axis, robustness_axis = axes.flat
    for (loss, kind, noise), group in gains[gains["metric"] == "zero-shot"].groupby(["loss", "kind", "noise"]):
        stats = group.groupby("size")["gain"].agg(["mean", "std"])
        gain_axis.errorbar(
            stats.index,
            100 * stats["mean"],
            yerr=100 * stats["std"].fillna(0),
            marker="o",
            capsize=3,
            label=f"{loss}, {kind} {noise:g}",
        )
    gain_axis.axhline(0, color="grey", lw=0.8)
    gain_axis.set(xscale="log", xlabel="training pairs", ylabel="zero-shot top-1 − CLIP (points)")
    gain_axis.set_title("PSD's gain against data size (mean ± std over seeds)", fontsize=9)
    memory = rows[rows["loss"] == "psd_memory"]
    for (kind, noise), group in memory.groupby(["kind", "noise"]):
        stats = group.groupby("size")["memory_auroc"].agg(["mean", "std"])
        auroc_axis.errorbar(
            stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=f"{kind} {noise:g}"
        )
        error_axis.errorbar(
            group["threshold_pairs"],
            100 * (group["noise_estimate"] - group["truth"]),
            yerr=[
                100 * (group["noise_estimate"] - group["noise_estimate_low"]),
                100 * (group["noise_estimate_high"] - group["noise_estimate"]),
            ],
            fmt="o",
            capsize=3,
            label=f"{kind} {noise:g}",
        )
    auroc_axis.set(xscale="log", xlabel="training pairs", ylabel="ROC AUC, wrong captions")
    auroc_axis.set_title("The remembered gap's detector against size", fontsize=9)
    error_axis.axhline(0, color="grey", lw=0.8)
    error_axis.set(xscale="log", xlabel="threshold pairs", ylabel="estimate − truth (points; bars: the range)")
    error_axis.set_title("The noise estimate against its threshold pairs", fontsize=9)
    for loss, group in rows.groupby("loss"):
        robustness_axis.scatter(group["zeroshot_test"], group["zeroshot_shifted"], label=loss, s=18)
    if fit is not None:
        clean = pd.Series(sorted(rows["zeroshot_test"].dropna()))
        predicted = [baseline_prediction(accuracy, *fit) for accuracy in clean]
        robustness_axis.plot(clean, predicted, color="grey", lw=1, label="CLIP's fit (logit space)")
    robustness_axis.set(xlabel="zero-shot top-1, clean test", ylabel="zero-shot top-1, shifted test")
    robustness_axis.set_title("Effective robustness: above the line is more robust than CLIP", fontsize=9)
    sizes = sorted(rows["size"].unique())
    for axis in (gain_axis, auroc_axis):
        axis.set_xticks(sizes, [f"{size:,}" for size in sizes])
    for axis in axes.flat:
        axis.minorticks_off()
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(folder: Path) -> dict[str, Path]:
    rows = pd.read_csv(folder / "rows.csv")
    rows, fit = with_effective_robustness(rows)
    gains = paired_gains(rows)
    sections = [
        f"# The noisy-caption study against data size ({len(rows)} runs)",
        "## Each loss − CLIP, paired by seed (test split, top-1)",
        markdown(gain_table(gains)),
    ]
    if (rows["loss"] == "psd_memory").any():
        sections += ["## The detector and the noise estimate (`loss=psd_memory`)", markdown(detector_table(rows))]
    if fit is not None:
        table = rows.groupby(["loss", "size"])["effective_robustness"].agg(mean_std).rename("effective robustness")
        sections += [
            f"## Effective robustness (CLIP's fit: logit(shifted) = {fit[0]:.3f} · logit(clean) {fit[1]:+.3f})",
            markdown(table.reset_index()),
        ]
    sections += ["## Cost per run (seconds on one GPU)", markdown(cost_table(rows))]
    paths = {"table": folder / "scaling.md", "plot": folder / "scaling.png"}
    paths["table"].write_text("\n\n".join(sections) + "\n")
    plot(rows, gains, fit, paths["plot"])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the study's --out folder (its rows.csv)")
    for kind, path in report(parser.parse_args().folder).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
