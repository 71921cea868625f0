"""The noisy-caption study against data size, for a lent GPU: every training in this one process (issue 43).

    python -m bench.scaling_study --out DIR [--sizes 550 5500 55000] [--seeds 0 1 2] [--cells flip:0.4:clip ...]
        [--epochs 30] [--workers 8] [--fashion-mnist DIR] [--cache DIR] [--cpu]

Each run is ``train.py experiment=noisy_captions`` at one training size (the first N of the training images; 55,000 is
all of them but the held-out val split), caption noise and loss, with the batch (128), learning rate and epochs fixed
across sizes, evaluated with ``evaluation=shifted`` (zero-shot and linear probe on the test split, zero-shot on its
corrupted copy and on val). Python starts once, so a lease spends its minutes training. The runs go in the order a lease
cut short should keep: the minimum grid (CLIP and PSD at 40% flip) before the rest, the smaller sizes first. Each run
appends its row to ``DIR/rows.csv`` as it ends (and prints it); a run whose row is there is skipped, so a later lease
continues where one stopped. A ``loss=psd_memory`` run also reports its noise estimate and range against the truth and
the pair memory's ROC AUC for the wrong captions. Runs write under ``DIR/runs`` (checkpoints included: leave it behind).

``--cpu``: the same on the CPU with a tiny grid (tests/test_scaling_study.py). The plan: docs/device_runs.md.
"""

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from psdclip.run.cli import check_settings

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
SIZES = (550, 5500, 55000)
# kind:noise:loss; the first two are the minimum, measured first at every size
CELLS = (
    "flip:0.4:clip",
    "flip:0.4:psd",
    "flip:0.4:psd_memory",
    "swap:0.4:clip",
    "swap:0.4:psd",
    "swap:0.4:psd_memory",
    "flip:0:clip",
    "flip:0:psd",
    "flip:0:psd_memory",
)
MINIMUM = 2
METRICS = {
    "zeroshot_test": "eval/fashion_mnist/zeroshot_top1",
    "zeroshot_shifted": "eval/fashion_mnist_shifted/zeroshot_top1",
    "zeroshot_val": "eval/fashion_mnist_val/zeroshot_top1",
    "linear_probe_test": "eval/fashion_mnist/linear_probe_top1",
}
ESTIMATE = ("noise_estimate", "noise_estimate_low", "noise_estimate_high")

log = logging.getLogger("scaling_study")


def grid(sizes: list[int], seeds: list[int], cells: list[str]) -> list[dict]:
    """The runs in the order a lease should keep them: the minimum cells at every size and seed, then the rest."""
    order = [cells[:MINIMUM], cells[MINIMUM:]]
    runs = []
    for part in order:
        for size in sizes:
            for seed in seeds:
                for cell in part:
                    kind, noise, loss = cell.split(":")
                    runs.append({"size": size, "kind": kind, "noise": float(noise), "loss": loss, "seed": seed})
    return runs


def run_name(run: dict) -> str:
    return f"n{run['size']}_{run['kind']}{run['noise']:g}_{run['loss']}_s{run['seed']}"


def run_config(run: dict, args: argparse.Namespace, folder: Path) -> DictConfig:
    """train.py's config for one run, checked as train.py checks it, with Hydra's run state set for ``train`` and the
    config saved in the run folder as Hydra saves it."""
    device = (
        ["trainer=cpu", "trainer.precision=32-true", "data.num_workers=0"]
        if args.cpu
        else ["trainer=gpu", f"data.num_workers={args.workers}"]
    )
    overrides = [
        "experiment=noisy_captions",
        f"data.train_size={run['size']}",
        f"data.noise={run['noise']}",
        f"data.noise_kind={run['kind']}",
        f"loss={run['loss']}",
        f"seed={run['seed']}",
        f"trainer.max_epochs={args.epochs}",
        "evaluation=shifted",
        "evaluation.tasks=[zeroshot,linear_probe]",
        "callbacks.learning_curve=null",
        "trainer.enable_progress_bar=false",
        f"paths.fashion_mnist_dir={args.fashion_mnist}",
        f"paths.cache_dir={args.cache or args.out / 'cache'}",
        f"paths.log_dir={args.out / 'logs'}",
        *device,
        *args.override,
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(folder)
        cfg.hydra.runtime.output_dir = str(folder)
    check_settings(cfg)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as @hydra.main hands it over
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")  # as Hydra saves it: what the audit's run= reads
    return cfg


def memory_figures(folder: Path) -> dict:
    """A ``loss=psd_memory`` run's noise estimate and range against the truth (the share of its pairs whose caption
    names another class: flip and swap captions all do), the remembered gap's ROC AUC for the wrong captions and the
    count of threshold pairs, from the audit of its memory."""
    from psdclip.tools.audit import audit

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="audit", overrides=[f"run={folder}", f"paths.output_dir={folder / 'audit'}"])
    memory = audit(cfg, folder / "audit")["memory"]
    return {
        **{name: memory[name] for name in ESTIMATE},
        "truth": memory.get("corrupted", 0) / memory["pairs"],
        "memory_auroc": memory.get("auroc"),
        "threshold_pairs": memory["threshold_pairs"],
    }


def measure(run: dict, args: argparse.Namespace) -> dict:
    from psdclip.training import train

    folder = args.out / "runs" / run_name(run)
    started = time.perf_counter()
    metrics = train(run_config(run, args, folder))
    seconds = time.perf_counter() - started
    row = {**run, **{name: metrics.get(key) for name, key in METRICS.items()}, "seconds": round(seconds, 1)}
    row["train_seconds"] = json.loads((folder / "summary.json").read_text())["wall_time_s"]
    if run["loss"] == "psd_memory":
        row.update(memory_figures(folder))
    return row


def append_row(path: Path, row: dict) -> None:
    """One row, written and flushed as the run ends; the header is the first row's keys plus any new ones."""
    rows = pd.read_csv(path).to_dict("records") if path.is_file() else []
    rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cells", nargs="+", default=list(CELLS), help="kind:noise:loss, the first two measured first")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--fashion-mnist", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--cache", type=Path, help="where the shards are written (default: OUT/cache)")
    parser.add_argument("--override", nargs="*", default=[], help="more train.py overrides, for every run")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (a tiny grid: pass --sizes)")
    args = parser.parse_args()
    args.sizes = args.sizes or ([64] if args.cpu else list(SIZES))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    rows_file = args.out / "rows.csv"
    done = set(pd.read_csv(rows_file).apply(lambda r: run_name(r.to_dict()), axis=1)) if rows_file.is_file() else set()
    for run in grid(args.sizes, args.seeds, args.cells):
        if run_name(run) in done:
            continue
        row = measure(run, args)
        append_row(rows_file, row)
        log.info("row: %s", json.dumps(row))
    log.info("all %d runs have their rows in %s", len(grid(args.sizes, args.seeds, args.cells)), rows_file)


if __name__ == "__main__":
    main()
