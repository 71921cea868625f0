"""Distillation-ratio schedules: how much of each batch is distilled at a given optimiser step."""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AlphaSchedule:
    """alpha(step) rises from 0 at ``start`` to ``alpha_max`` at ``end`` (default: the last training step)."""

    alpha_max: float = 0.5
    start: int = 0
    end: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.alpha_max < 1.0:
            raise ValueError(f"alpha_max must be in [0, 1), got {self.alpha_max}: at 1 no pair keeps its hard target")
        if self.start < 0 or (self.end is not None and self.end < self.start):
            raise ValueError(f"ramp must satisfy 0 <= ramp_start <= ramp_end, got start={self.start}, end={self.end}")

    def progress(self, step: int, total_steps: int) -> float:
        end = self.end if self.end is not None else max(total_steps - 1, self.start)
        if end <= self.start:
            return 1.0 if step >= self.start else 0.0
        return min(max((step - self.start) / (end - self.start), 0.0), 1.0)

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


SCHEDULES = {"linear": LinearSchedule, "cosine": CosineSchedule, "constant": ConstantSchedule}


def make_schedule(name: str, alpha_max: float, start: int = 0, end: int | None = None) -> AlphaSchedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown alpha schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](alpha_max=alpha_max, start=start, end=end)
