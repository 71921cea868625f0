"""The teachers that supply soft targets: the momentum (EMA) teacher, a slowly averaged copy of the dual encoder, and
a frozen teacher read from an earlier run's checkpoint. The training step (``psdclip.module``) builds one, runs it
where the loss needs it and updates it after each optimiser step."""

import copy

import torch
from torch import Tensor, nn

from psdclip.models import read_checkpoint


class Teacher(nn.Module):
    """A no-grad copy of the dual encoder, a registered submodule (its weights travel in the checkpoint)."""

    name: str  # the conf/teacher option, as run summaries report it

    def __init__(self, model: nn.Module, compile: bool):
        super().__init__()
        self.model = copy.deepcopy(model).requires_grad_(False)
        if compile:  # a deep copy drops the student's compiled call
            self.model.compile()

    def update(self, model: nn.Module) -> None:
        """Called after each optimiser step with the student."""

    @torch.no_grad()
    def forward(self, images: Tensor, texts: Tensor) -> dict[str, Tensor]:
        self.model.eval()
        return self.model(images, texts)


class EMATeacher(Teacher):
    """Exponential moving average of ``model``'s weights; buffers are copied (open_clip's causal attention mask
    holds -inf, and -inf - -inf is NaN).

    A registered submodule, so its weights travel in the checkpoint; it never receives gradients. The first update
    copies the student (as torch's ``AveragedModel`` does). With ``bias_correction`` the n-th update moves
    ``(1 - decay) / (1 - decay^n)`` of the way to the student, so the teacher is the decay-weighted mean of the
    weights the student has had (Adam's bias correction); a plain EMA moves ``1 - decay`` and keeps ``decay^n`` of the
    random initial weights (37% after 100 updates at 0.99), so early in training its evidence is mostly noise.

    Args:
        model: the student, copied at construction.
        decay: the average's weight on its past.
        bias_correction: weigh only the weights the student has had, not the initial copy (see above).
        compile: compile the copy's forward (a deep copy drops the student's compiled call).
    """

    name = "ema"

    def __init__(self, model: nn.Module, decay: float, bias_correction: bool, compile: bool):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"teacher.decay must be in (0, 1), got {decay}")
        super().__init__(model, compile)
        self.decay, self.bias_correction = decay, bias_correction
        # updates so far: on the device, so the first update's full copy needs no host sync
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # lerp with weight 1 returns the end point exactly: the first update is a copy (1 - decay^1 = 1 - decay)
        if self.bias_correction:
            weight = ((1.0 - self.decay) / (1.0 - self.decay ** (self.updates + 1).double())).to(torch.float32)
        else:
            weight = torch.where(self.updates == 0, 1.0, 1.0 - self.decay).to(torch.float32)
        for average, current in zip(self.model.parameters(), model.parameters(), strict=True):
            average.lerp_(current.detach(), weight.to(average.device, average.dtype))
        for average, current in zip(self.model.buffers(), model.buffers(), strict=True):
            average.copy_(current)
        self.updates += 1


class FrozenTeacher(Teacher):
    """An earlier run's trained model, never updated: the teacher of a second training on the same data
    (``teacher=frozen``), which then distils from its first step targets that already know the data, where an EMA
    teacher started from random weights has nothing to give until it has learnt.

    Args:
        model: the student, whose architecture the checkpoint's weights must have.
        checkpoint: a ``train.py`` checkpoint (e.g. the audited run's ``last.ckpt``).
        weights: ``ema`` (its EMA teacher) or ``student``.
        compile: compile the copy's forward.
    """

    name = "frozen"

    def __init__(self, model: nn.Module, checkpoint: str, weights: str, compile: bool):
        super().__init__(model, compile)  # in place: the parameter names the state dict is loaded under are unchanged
        name, state = read_checkpoint(checkpoint, weights)
        try:
            self.model.load_state_dict(state)
        except RuntimeError as exn:  # torch's message lists every key: say what differs instead
            raise ValueError(
                f"teacher.checkpoint={checkpoint} holds a {name} model, which does not fit the student's "
                "architecture: train with the model.name it was trained with"
            ) from exn
