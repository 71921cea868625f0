"""Optimiser steps of the tiny model on given batches (``one_step``: one batch), with what they computed: the logged
loss, D, the gradients the optimiser saw, the weights and EMA teacher after them, and the epoch's D diagnostics. The
DDP and micro-batch tests compare such steps."""

from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from psdclip.models import create_clip
from psdclip.module import DIAGNOSTICS, LOSS_OUTPUT, PSDCLIPModule
from tests.helpers.losses import from_settings
from tests.helpers.trainers import quiet_trainer

OPTIM_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "optim" / "adamw.yaml"


def optim(**settings) -> dict:
    """The module's optimiser, schedule and micro-batches as ``optim=adamw`` makes them, with ``settings`` (keys
    below ``optim``, e.g. ``{"optimizer.lr": 1e-2}``) changed."""
    cfg = OmegaConf.load(OPTIM_CONFIG)
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value)
    return instantiate(cfg)


def global_batch(size: int, seed: int = 1, pair_info: bool = False) -> tuple[torch.Tensor, ...]:
    """Images and tokens; with ``pair_info`` also noise marks (unknown, clean and corrupted in turn), pair ids and
    threshold-pair flags (none)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 28, 28, generator=generator)
    texts = torch.randint(1, 49407, (size, 16), generator=generator)
    if not pair_info:
        return images, texts
    marks = (torch.arange(size) % 3 - 1).to(torch.int8)
    return images, texts, marks, torch.arange(size) * 3 + 1, torch.zeros(size, dtype=torch.bool)


def make_module(loss_kwargs: dict, local_loss: bool = False, micro_batches: int = 1) -> PSDCLIPModule:
    """The tiny model with the loss and teacher of ``loss_kwargs`` (``tests.helpers.losses.from_settings``)."""
    torch.manual_seed(0)
    module = PSDCLIPModule(
        create_clip("psdclip-vit-tiny"),
        *from_settings(**loss_kwargs, local_loss=local_loss),
        **optim(**{"scheduler.warmup_steps": 1, "optimizer.eps": 1e-4, "micro_batches": micro_batches}),
    )
    if module.teacher is not None:  # a teacher that differs from the student, so its soft targets matter
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for param in module.teacher.model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return module


class Capture(L.Callback):
    """Gradients as the optimiser sees them (after DDP's all-reduce) and the logged loss."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {name: p.grad.clone() for name, p in pl_module.model.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss = trainer.callback_metrics["train/loss"].clone()
        self.distill = outputs[LOSS_OUTPUT].subset.chosen.cpu().clone()


class Batches:
    """A data loader of the given batches, in order."""

    def __init__(self, *batches):
        self.batches = batches

    def __iter__(self):
        yield from self.batches

    def __len__(self) -> int:
        return len(self.batches)


def one_step(module: PSDCLIPModule, batch, **trainer_kwargs) -> dict:
    return train_steps(module, [batch], **trainer_kwargs)


def train_steps(module: PSDCLIPModule, batches: list, **trainer_kwargs) -> dict:
    """One optimiser step per batch; the last step's loss, D and gradients, the weights and teacher after them, and
    the epoch's D diagnostics (those logged)."""
    capture = Capture()
    trainer = quiet_trainer(
        max_steps=len(batches),
        callbacks=[capture],
        use_distributed_sampler=False,
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=Batches(*batches))
    teacher = module.teacher.model if module.teacher is not None else None
    return {
        "loss": capture.loss,
        "grads": capture.grads,
        "distill": capture.distill,
        "weights": {k: v.detach().clone() for k, v in module.model.state_dict().items()},
        "teacher": {k: v.detach().clone() for k, v in teacher.state_dict().items()} if teacher else {},
        "rule": {k: v.detach().clone() for k, v in module.loss.subset.state_dict().items()},  # e.g. the pair memory
        "epoch": {
            name: trainer.callback_metrics[name].clone() for name in DIAGNOSTICS if name in trainer.callback_metrics
        },
    }
