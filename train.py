"""Train a CLIP-style model with progressive self-distillation: `python train.py [overrides]`."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from psdclip.run.cli import check_overrides, check_settings, reported_errors, sweep_objective


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with reported_errors():
        check_settings(cfg)
        # imported after Hydra has parsed the overrides and the settings are checked: torch and Lightning take
        # seconds to load, which a mistyped setting should not wait for
        from psdclip.training import train

        metrics = train(cfg)
        return sweep_objective(cfg, metrics, sweeping=HydraConfig.get().mode == RunMode.MULTIRUN)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
