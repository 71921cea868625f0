"""What the command-line entry points share: overrides and settings checked before torch loads, and the project's own
start-up errors printed as one line instead of a stack.

This module imports neither torch nor Lightning, so that a mistyped setting is reported in about a second.
"""

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from psdclip.run.runlog import announce

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # psdclip/


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# setting → (is the value valid, what to give instead); settings a config lacks are not checked
SETTINGS: dict[str, tuple[Callable, str]] = {
    "optim.optimizer.lr": (lambda v: is_number(v) and v > 0, "a positive learning rate, e.g. optim.optimizer.lr=1e-3"),
    "optim.optimizer.weight_decay": (
        lambda v: is_number(v) and v >= 0,
        "a weight decay >= 0, e.g. optim.optimizer.weight_decay=0.1",
    ),
    "optim.optimizer.eps": (lambda v: is_number(v) and v > 0, "a positive epsilon, e.g. optim.optimizer.eps=1e-6"),
    "optim.optimizer.betas": (
        lambda v: len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v),
        "two coefficients in [0, 1), e.g. optim.optimizer.betas=[0.9,0.98]",
    ),
    "optim.scheduler.warmup_steps": (
        lambda v: isinstance(v, int) and v >= 0,
        "a whole number of steps >= 0, e.g. optim.scheduler.warmup_steps=100",
    ),
    "optim.scheduler.min_lr_ratio": (
        lambda v: is_number(v) and 0 <= v <= 1,
        "a ratio in [0, 1], e.g. optim.scheduler.min_lr_ratio=0",
    ),
    "optim.micro_batches": (
        lambda v: isinstance(v, int) and v >= 1,
        "1 (the whole batch at once) or more pieces, e.g. optim.micro_batches=4",
    ),
    "data.batch_size": (lambda v: isinstance(v, int) and v > 0, "a positive whole number, e.g. data.batch_size=256"),
    "data.num_workers": (
        lambda v: isinstance(v, int) and v >= 0,
        "0 (load in the main process) or more workers, e.g. data.num_workers=4",
    ),
    "evaluation.batch_size": (
        lambda v: isinstance(v, int) and v > 0,
        "a positive whole number, e.g. evaluation.batch_size=256",
    ),
    "evaluation.num_workers": (
        lambda v: isinstance(v, int) and v >= 0,
        "0 or more workers, e.g. evaluation.num_workers=4",
    ),
}


def check_settings(cfg: DictConfig) -> None:
    """Raise a ValueError naming the first setting of ``SETTINGS`` whose value cannot work, and what to give.

    The entry points call it before anything is built; so must any other caller of ``psdclip.training.train``.
    """
    for key in SETTINGS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        check_setting(key, OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value)
    check_micro_batches(cfg)


def check_setting(key: str, value) -> None:
    """Raise a ValueError if ``value`` cannot work as the setting ``key`` of ``SETTINGS``, saying what to give."""
    valid, expected = SETTINGS[key]
    try:
        ok = valid(value)
    except TypeError:  # a string or list where a number belongs
        ok = False
    if not ok:
        raise ValueError(f"{key}={value} cannot work: give {expected}")


def check_micro_batches(cfg: DictConfig) -> None:
    """Refuse what cannot go with ``optim.micro_batches`` > 1, whose steps the module optimises by hand."""
    pieces = OmegaConf.select(cfg, "optim.micro_batches", default=1)
    if pieces == 1:
        return
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1)
    if accumulate != 1:
        raise ValueError(
            f"optim.micro_batches={pieces} and trainer.accumulate_grad_batches={accumulate} cannot be combined: "
            "micro_batches computes one contrastive batch of data.batch_size pairs in pieces (negatives span the whole "
            "batch), accumulate_grad_batches averages the gradients of separate batches (negatives do not span them); "
            "keep one, e.g. a 4x larger data.batch_size with optim.micro_batches=4 and trainer.accumulate_grad_batches=1"
        )
    if OmegaConf.select(cfg, "trainer.gradient_clip_val", default=None):
        raise ValueError(
            f"optim.micro_batches={pieces} does not support gradient clipping (Lightning clips only "
            "steps it optimises itself): set trainer.gradient_clip_val=null or optim.micro_batches=1"
        )
    batch_size = OmegaConf.select(cfg, "data.batch_size", default=None)
    if isinstance(batch_size, int) and batch_size < pieces:
        raise ValueError(
            f"optim.micro_batches={pieces} cannot split data.batch_size={batch_size} pairs: give at most "
            f"data.batch_size pieces, e.g. optim.micro_batches={max(batch_size // 4, 1)}"
        )


def quoted_fix(override: str) -> str:
    """``key=value`` as a shell argument that reaches Hydra with the value quoted."""
    key, _, value = override.partition("=")
    return f"\"{key}='{value}'\""


def check_overrides(args: list[str]) -> None:
    """Exit with the fix for a brace pattern that Hydra (unquoted) or the shell (expanded) would mangle.

    Hydra reads ``{…}`` in an override value as a dictionary and stops with "mismatched input '{'"; an unquoted
    pattern in bash becomes one override per shard instead, of which Hydra silently keeps the last.
    """
    parser = OverridesParser.create()
    tar_values: dict[str, list[str]] = {}
    for arg in args:
        if arg.startswith("-") or "=" not in arg:  # Hydra's own flags (-m, --cfg job, -cn train …)
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except OverrideParseException:
            if "{" in arg:
                fail(
                    f"{arg}: Hydra reads {{…}} in a value as a dictionary; quote the pattern inside the argument: {quoted_fix(arg)}"
                )
            continue  # Hydra reports other syntax errors itself
        if arg.endswith(".tar"):
            tar_values.setdefault(override.key_or_group, []).append(arg)
    for key, values in tar_values.items():
        if len(values) > 1:
            fail(
                f"{key} is given {len(values)} times ({values[0]}, {values[1]}, …): the shell expanded a brace pattern "
                f"into one override per shard; quote it, e.g. \"{key}='/data/cc12m/{{00000..01242}}.tar'\""
            )


def sweep_objective(cfg: DictConfig, metrics: dict[str, float], sweeping: bool) -> float | None:
    """``cfg.optimized_metric`` of the run's final ``metrics``, what ``python train.py -m`` hands its sweeper.

    In a sweep a name the run did not measure (a typo, an evaluation set not configured) raises: the sweeper would
    otherwise get None for every trial and optimise nothing.
    """
    name = cfg.get("optimized_metric")
    if sweeping and name and name not in metrics:
        measured = sorted(key for key in metrics if key.startswith("eval/"))
        raise ValueError(f"optimized_metric {name!r} was not measured by this run; it measured {measured}")
    return metrics.get(name)


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def own_error(exn: BaseException) -> BaseException | None:
    """The configuration or data error that psdclip code raised behind ``exn`` (unwrapping Hydra's
    InstantiationException), or None for anything else, whose stack is worth seeing."""
    while isinstance(exn, InstantiationException) and exn.__cause__ is not None:
        exn = exn.__cause__
    if not isinstance(exn, (ValueError, FileNotFoundError)) or exn.__traceback__ is None:
        return None
    tb = exn.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    raised_in = Path(tb.tb_frame.f_code.co_filename).resolve()
    return exn if raised_in.is_relative_to(PACKAGE_DIR) else None


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Print psdclip's own start-up errors as ``error: <message>`` and exit 1; the full stack with HYDRA_FULL_ERROR=1."""
    try:
        yield
    except Exception as exn:
        error = own_error(exn)
        if error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        announce(f"error: {error}\n(set HYDRA_FULL_ERROR=1 to see the stack)", error=True)
        raise SystemExit(1) from None
