"""Evaluate a checkpoint (ours, or an open_clip model with weights): `python evaluate.py ckpt=<path> [evaluation=...]`."""

import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from psdclip.cli import check_overrides, check_settings, reported_errors


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
        metrics = suite.run(encoders, Runtime(fabric.device, fabric.autocast, fabric.global_rank, fabric.world_size, fabric.all_gather))
        if fabric.is_global_zero:
            path = write_results(cfg.results_file, metrics, model=encoders.name, ckpt=cfg.ckpt, pretrained=cfg.model.pretrained, timings_s=suite.timings)
            print(f"\n{format_results(metrics)}\nresults: {path}")
    return metrics


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
