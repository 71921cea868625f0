"""Evaluate a checkpoint (ours, or an open_clip model with weights): `python evaluate.py ckpt=<path> [evaluation=...]`."""

import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from psdclip.run.cli import check_overrides, check_settings, reported_errors
from psdclip.run.runlog import announce


def results_path(cfg: DictConfig) -> Path:
    """``results_file``, else beside the checkpoint (``last.ckpt`` → ``last.eval.json``), else in this run's folder."""
    if cfg.results_file:
        return Path(cfg.results_file)
    if cfg.ckpt:
        return Path(cfg.ckpt).with_suffix(".eval.json")
    return Path(cfg.paths.output_dir, "results.json")


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> dict[str, float]:
    with reported_errors():
        check_settings(cfg)
        # after Hydra has parsed the overrides: torch, Lightning and open_clip take seconds to load
        from psdclip.eval.features import Runtime
        from psdclip.eval.model import load_encoders
        from psdclip.eval.suite import format_results, write_results

        fabric = instantiate(cfg.fabric)
        fabric.launch()
        encoders = load_encoders(cfg.ckpt, cfg.model.name, cfg.model.pretrained).to(fabric.device).eval()
        suite = instantiate(cfg.evaluation)
        metrics = suite.run(
            encoders, Runtime(fabric.device, fabric.autocast, fabric.global_rank, fabric.world_size, fabric.all_gather)
        )
        if fabric.is_global_zero:
            path = write_results(
                results_path(cfg),
                metrics,
                model=encoders.name,
                ckpt=cfg.ckpt,
                pretrained=cfg.model.pretrained,
                timings_s=suite.timings,
            )
            announce(f"\n{format_results(metrics)}\nresults: {path}")
    return metrics


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
