"""The noise estimate against the truth, run by run, before and after the donor correction
(docs/noisy_caption_study.md, "The noise estimate's bias and its coverage").

    python docs/noise_estimate_study.py RUN [RUN ...] [--csv OUT.csv] [--plot OUT.png]

Each RUN is a ``loss=psd_memory`` training folder on the embedded data (its ``.hydra/config.yaml`` and
``checkpoints/last.ckpt``). For every run it reads the pair memory and the shards' own marks (each image's class and
the class its caption names) and prints one row: the truth (the share of the data's own pairs, seen ``min_sightings``
times, whose caption names another class), the estimate before the correction (the ratio past the threshold pairs'
cut-off, with its binomial standard error, and whether ±1.96 se covers the truth) and after it (the range and its
middle, ``psdclip.subsets.noise_estimate``, as training now logs them, and whether the range holds the truth), and what tells the candidate causes of a bias apart: the threshold pairs whose
donor caption names their image's own class (a clean pair in disguise), the clean pairs past the cut-off, and the
wrong captions past it (an unbiased ratio has as large a share of them past it as of the threshold pairs).
"""

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import webdataset as wds
from hydra.utils import instantiate
from omegaconf import OmegaConf

from psdclip.data.pipeline import PairIds
from psdclip.run.checkpoint_files import load_checkpoint_file

MEMORY_DEFAULTS = Path(__file__).resolve().parents[1] / "conf" / "loss" / "subset" / "memory.yaml"


def run_pairs(run: Path) -> tuple[pd.DataFrame, object, dict]:
    """Every pair of the run's data with its memory entry and marks, the run's memory rule holding the memory (with
    today's estimate settings where the run predates them), and the run's data settings."""
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg.paths.output_dir = str(run)
    rule = instantiate(OmegaConf.merge(OmegaConf.load(MEMORY_DEFAULTS), cfg.loss.subset))
    state = load_checkpoint_file(run / "checkpoints" / "last.ckpt")["state_dict"]
    state = {key.removeprefix("loss.subset."): value for key, value in state.items() if key.startswith("loss.subset.")}
    rule.memory.allocate(len(state["memory.scores"]))
    rule.load_state_dict(state)
    data = instantiate(cfg.data, transform=lambda image: image, tokenizer=lambda captions: captions)
    data.prepare_data()
    stream = data.stream()  # how training plants the threshold pairs: the same pool, seed and donors
    shards = data.resolved_shards
    ids = PairIds([s.url for s in shards], [s.size for s in shards], 0, 0.0)
    samples = [
        (sample, ids.of(sample["__url__"], sample["__key__"], index))
        for shard in shards
        for index, sample in enumerate(wds.WebDataset(shard.url, shardshuffle=False).decode())
    ]
    named = {sample["txt"]: sample["json"]["caption_label"] for sample, _ in samples}  # caption → class it names
    scores, sightings = rule.memory.scores.float().numpy(), rule.memory.sightings.long().numpy()
    planted = rule.memory.planted.numpy()
    rows = []
    for sample, pair_id in samples:
        meta = sample["json"]
        donor = stream.threshold_caption(pair_id, sample["txt"]) if planted[pair_id] else None
        rows.append(
            {
                "gap": float(scores[pair_id]),
                "sightings": int(sightings[pair_id]),
                "threshold_pair": bool(planted[pair_id]),
                "label": meta["label"],
                # the class the caption training saw names: the donor's for a threshold pair (-1: none, generic)
                "named": named.get(donor, -1) if donor is not None else meta["caption_label"],
            }
        )
    table = pd.DataFrame(rows)
    settings = {"noise": cfg.data.noise, "kind": cfg.data.noise_kind, "seed": cfg.seed}
    return table[table["sightings"] >= rule.min_sightings], rule, settings


def ratio_estimate(own: np.ndarray, planted: np.ndarray, tail: float) -> tuple[float, float, float]:
    """The estimate before the correction (the ratio past the cut-off, a binomial standard error from the threshold
    pairs' count), as training computed it up to then: (estimate, standard error, cut-off)."""
    n = len(planted)
    quantile = max(0.5, 1 - tail / math.sqrt(max(n, 1)))
    cut = float(np.sort(planted)[math.floor(quantile * (n - 1))])
    past, planted_past = float((own > cut).mean()), float((planted > cut).mean())
    estimate = min(past / planted_past, 1.0)
    return estimate, estimate * math.sqrt((1 - planted_past) / (planted_past * n)), cut


def study_row(run: Path) -> dict:
    pairs, rule, settings = run_pairs(run)
    own, planted = pairs[~pairs["threshold_pair"]], pairs[pairs["threshold_pair"]]
    wrong = own["named"] != own["label"]  # names another class; a generic caption names none
    truth = float((wrong & (own["named"] >= 0)).mean())
    before, before_se, cut = ratio_estimate(own["gap"].to_numpy(), planted["gap"].to_numpy(), rule.estimate_tail)
    after = {name: float(value) for name, value in rule.epoch_statistics().items()}
    fits = planted["named"] == planted["label"]  # a donor caption that names the image's own class
    without_fits, _, _ = ratio_estimate(own["gap"].to_numpy(), planted[~fits]["gap"].to_numpy(), rule.estimate_tail)
    planted_past = float((planted["gap"] > cut).mean())
    return {
        "run": run.parent.name if run.name == "run" else run.name,
        **settings,
        "truth": truth,
        "corrupted": float((wrong | (own["named"] < 0)).mean()),
        "before": before,
        "before_se": before_se,
        "before_covered": abs(before - truth) <= 1.96 * before_se,
        "after": after["noise_estimate"],
        "after_low": after["noise_estimate_low"],
        "after_high": after["noise_estimate_high"],
        "after_covered": after["noise_estimate_low"] <= truth <= after["noise_estimate_high"],
        "threshold_pairs": len(planted),
        "donor_fits": float(fits.mean()),
        "before_without_fitting_donors": without_fits,
        "clean_past_cut": float(((own["gap"] > cut) & ~wrong).mean()) / planted_past,
        # past the cut-off: the share of the wrong captions and of the threshold pairs (equal for an unbiased ratio)
        "wrong_past_cut": float((own["gap"][wrong] > cut).mean()) if wrong.any() else math.nan,
        "planted_past_cut": planted_past,
    }


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per kind and noise level: mean error and coverage, before and after."""
    table = table.assign(before_error=table["before"] - table["truth"], after_error=table["after"] - table["truth"])
    return table.groupby(["kind", "noise"]).agg(
        runs=("truth", "size"),
        truth=("truth", "mean"),
        before_error=("before_error", "mean"),
        before_covered=("before_covered", "sum"),
        after_error=("after_error", "mean"),
        after_covered=("after_covered", "sum"),
    )


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    titles = (("before", "before: the ratio ± 1.96 se"), ("after", "after: the range and its middle"))
    for axis, (column, title) in zip(axes, titles):
        for kind, marker in (("flip", "o"), ("swap", "s"), ("generic", "^")):
            rows = table[table["kind"] == kind]
            covered = rows[f"{column}_covered"]
            for hit, face in ((True, None), (False, "none")):
                part = rows[covered == hit]
                spread = (
                    1.96 * part["before_se"]
                    if column == "before"
                    else [part["after"] - part["after_low"], part["after_high"] - part["after"]]
                )
                axis.errorbar(
                    part["truth"] + (0.01 if kind == "swap" else 0),
                    part[column],
                    yerr=spread,
                    fmt=marker,
                    mfc=face,
                    capsize=2,
                    color={"flip": "C0", "swap": "C1", "generic": "C2"}[kind],
                    label=f"{kind}{'' if hit else ', misses the truth'}" if len(part) else None,
                )
        axis.plot([0, 0.7], [0, 0.7], color="grey", lw=1)
        axis.set(title=title, xlabel="truth (share of captions naming another class)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("noise estimate")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = pd.DataFrame([study_row(run) for run in args.runs])
    pd.set_option("display.width", 250)
    print(table.round(3).to_string(index=False))
    print(summary(table).round(3).to_string())
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.plot:
        plot(table, args.plot)


if __name__ == "__main__":
    main()
