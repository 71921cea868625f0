"""Schedules over the optimiser steps: the distillation ratio alpha (how much of each batch may be distilled) and the
learning rate."""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AlphaSchedule:
    """alpha(step) rises from 0 at ``start`` to ``alpha_max`` at ``end`` (default: the last training step).

    ``start`` and ``end`` follow Lightning's ``val_check_interval`` convention: an int is a step, a float a fraction of
    the training's steps (0.5: half-way), so one setting means the same point of a short run and of a long one.
    """

    alpha_max: float = 0.5
    start: float = 0
    end: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.alpha_max < 1.0:
            raise ValueError(f"alpha_max must be in [0, 1), got {self.alpha_max}: at 1 no pair keeps its hard target")
        for name, value in (("ramp_start", self.start), ("ramp_end", self.end)):
            if isinstance(value, float) and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value}: a float is a fraction of the training steps, in [0, 1]")
            if isinstance(value, int) and value < 0:
                raise ValueError(f"{name}={value}: a step must be >= 0")
        if self.end is not None and type(self.start) is type(self.end) and self.end < self.start:
            raise ValueError(f"ramp must satisfy ramp_start <= ramp_end, got start={self.start}, end={self.end}")

    def bounds(self, total_steps: int) -> tuple[int, int]:
        """The ramp's first and last step in a run of ``total_steps``."""
        start = step_of(self.start, total_steps)
        end = step_of(self.end, total_steps) if self.end is not None else max(total_steps - 1, start)
        if end < start:
            raise ValueError(f"ramp must satisfy ramp_start <= ramp_end, got steps {start} and {end} of {total_steps}")
        return start, end

    def progress(self, step: int, total_steps: int) -> float:
        start, end = self.bounds(total_steps)
        if end <= start:
            return 1.0 if step >= start else 0.0
        return min(max((step - start) / (end - start), 0.0), 1.0)

    def __call__(self, step: int, total_steps: int) -> float:
        return self.alpha_max * self.shape(self.progress(step, total_steps))

    @staticmethod
    def shape(progress: float) -> float:
        raise NotImplementedError


class LinearSchedule(AlphaSchedule):
    @staticmethod
    def shape(progress: float) -> float:
        return progress


class CosineSchedule(AlphaSchedule):
    """Half-cosine ramp: slow start and slow finish."""

    @staticmethod
    def shape(progress: float) -> float:
        return 0.5 * (1.0 - math.cos(math.pi * progress))


class ConstantSchedule(AlphaSchedule):
    @staticmethod
    def shape(progress: float) -> float:
        return 1.0


def step_of(point: float, total_steps: int) -> int:
    """A step as given (int), or a fraction of the run's last step (float)."""
    return point if isinstance(point, int) else round(point * max(total_steps - 1, 0))


SCHEDULES = {"linear": LinearSchedule, "cosine": CosineSchedule, "constant": ConstantSchedule}


def make_schedule(name: str, alpha_max: float, start: float = 0, end: float | None = None) -> AlphaSchedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown alpha schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](alpha_max=alpha_max, start=start, end=end)


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule: linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` × the
    LR at ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio)
    )


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
