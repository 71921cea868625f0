"""A random tiny model saved the way train.py saves it, for the evaluation and bad-input tests."""

from pathlib import Path

import torch

from psdclip.models import create_clip
from psdclip.module import PSDCLIPModule
from tests.helpers.losses import make_loss
from tests.helpers.one_step import optim
from tests.helpers.trainers import quiet_trainer


def save_tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    module = PSDCLIPModule(create_clip("psdclip-vit-tiny"), make_loss(alpha_max=0.0), None, **optim())
    trainer = quiet_trainer()
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path
