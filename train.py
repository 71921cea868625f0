"""Train a CLIP-style model with progressive self-distillation: `python train.py [overrides]`."""

import sys

import hydra
from omegaconf import DictConfig

from psdclip.cli import check_overrides, check_settings, reported_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with reported_errors():
        check_settings(cfg)
        # imported after Hydra has parsed the overrides and the settings are checked: torch and Lightning take
        # seconds to load, which a mistyped setting should not wait for
        from psdclip.training import train

        metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
