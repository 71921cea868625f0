"""The momentum (EMA) teacher: a slowly averaged copy of the dual encoder that supplies soft targets."""

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMATeacher(nn.Module):
    """Exponential moving average of ``model``'s weights, updated after each optimiser step.

    A registered submodule, so its weights travel in the checkpoint; it never receives gradients.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        # buffers are copied, not averaged: lerp turns open_clip's -inf attention mask into NaN
        self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.average.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.average.update_parameters(model)
        for mine, theirs in zip(self.average.module.buffers(), model.buffers()):
            mine.copy_(theirs)

    @torch.no_grad()
    def forward(self, images: Tensor, texts: Tensor) -> dict[str, Tensor]:
        self.average.eval()
        return self.average.module(images, texts)
