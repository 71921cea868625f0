"""Train a CLIP-style model with progressive self-distillation: `python train.py [overrides]`."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from psdclip.run.cli import check_overrides, check_settings, reported_errors, sweep_objective
from psdclip.run.jobs import run_sweep_job


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with reported_errors():
        check_settings(cfg)
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # a job of `python train.py -m …`, on ranks of its own
            return run_sweep_job(cfg, entry_point=__file__)
        if cfg.get("recipe"):  # several stages, each its own process (psdclip/run/recipe.py)
            from psdclip.run.recipe import run_recipe

            hydra_cfg = HydraConfig.get()
            metrics = run_recipe(cfg, list(hydra_cfg.overrides.task), Path(hydra_cfg.runtime.output_dir))
            return sweep_objective(cfg, metrics, sweeping=False)
        # imported after Hydra has parsed the overrides and the settings are checked: torch and Lightning take
        # seconds to load, which a mistyped setting should not wait for
        from psdclip.training import train

        return sweep_objective(cfg, train(cfg), sweeping=False)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
