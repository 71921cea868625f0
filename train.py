"""Train a CLIP-style model with progressive self-distillation: `python train.py [overrides]`."""

import hydra
from omegaconf import DictConfig

from psdclip.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
