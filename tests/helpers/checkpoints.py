"""A random tiny model saved the way train.py saves it, for the evaluation and bad-input tests."""

from pathlib import Path

import lightning as L
import torch
from omegaconf import ListConfig

from psdclip.loss import PSDLoss
from psdclip.models import create_clip
from psdclip.module import PSDCLIPModule


def save_tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    # hyperparameters as OmegaConf containers, as train.py passes them
    module = PSDCLIPModule(
        create_clip("psdclip-vit-tiny"), PSDLoss(alpha_max=0.0, schedule="constant"), betas=ListConfig([0.9, 0.98])
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path
