"""A DDP step on 2 CPU processes (gloo) equals one process on the concatenated batch: loss, gradients, weights, EMA."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy

from tests.helpers.losses import EMA_OUTSCORED
from tests.helpers.one_step import global_batch as batch_of
from tests.helpers.one_step import make_module, one_step
from tests.helpers.processes import free_port, join_ranks_as

WORLD, PER_RANK = 2, 8
RANDOM = {"subset": "random", "scope": "subset"}  # the random rule (loss=psd_random)
DOUBT = {"subset": "doubt", "scope": "batch"}  # D = the pairs the teacher doubts most
EMA_DOUBT = dict(alpha_max=0.5, schedule="constant", teacher="ema", ema_decay=0.9, **DOUBT)
CASES = [  # (loss settings, local_loss, micro_batches per rank)
    ({"alpha_max": 0.0, "schedule": "constant"}, False, 1),
    ({"alpha_max": 0.0, "schedule": "constant"}, True, 1),
    (dict(alpha_max=0.5, schedule="constant", teacher="self", **RANDOM), False, 1),
    (dict(alpha_max=0.5, schedule="constant", teacher="self", **RANDOM), True, 1),
    (dict(alpha_max=0.5, schedule="constant", teacher="ema", ema_decay=0.9, **RANDOM), False, 1),
    (dict(alpha_max=0.5, schedule="constant", teacher="ema", ema_decay=0.9, **RANDOM), True, 1),
    (EMA_DOUBT, False, 1),
    (EMA_DOUBT, True, 1),
    (dict(alpha_max=0.5, schedule="constant", teacher="self", **DOUBT), True, 1),
    (EMA_OUTSCORED, False, 1),
    (EMA_OUTSCORED, True, 1),
    # each rank computes its share in pieces; the reference is one process on the whole batch at once
    (EMA_OUTSCORED, False, 2),
    (EMA_OUTSCORED, True, 2),
    # the pair memory records the gathered batch: the same table on every rank as in one process
    ({**EMA_OUTSCORED, "subset": "memory"}, False, 1),
    ({**EMA_OUTSCORED, "subset": "memory"}, True, 2),
]
IDS = [
    "clip",
    "clip-local",
    "psd-self",
    "psd-self-local",
    "psd-ema",
    "psd-ema-local",
    "doubt-ema",
    "doubt-ema-local",
    "doubt-self-truncation-local",
    "outscored-ema",
    "outscored-ema-local",
    "outscored-ema-micro-batches",
    "outscored-ema-local-micro-batches",
    "memory-ema",
    "memory-ema-local-micro-batches",
]


def global_batch() -> tuple[torch.Tensor, ...]:
    return batch_of(WORLD * PER_RANK, pair_info=True)


def worker(rank: int, port: int, out_dir: str) -> None:
    join_ranks_as(rank, WORLD, port)
    torch.set_num_threads(1)
    batch = global_batch()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for index, (loss_kwargs, local_loss, micro_batches) in enumerate(CASES):
        result = one_step(
            make_module(loss_kwargs, local_loss, micro_batches),
            tuple(part[rows] for part in batch),
            devices=WORLD,
            strategy=DDPStrategy(process_group_backend="gloo"),
        )
        torch.save(result, os.path.join(out_dir, f"case{index}-rank{rank}.pt"))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, start_method="spawn")
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_ddp_step_equals_single_process(ddp_results, index):
    loss_kwargs, local_loss, _ = CASES[index]
    torch.set_num_threads(1)
    reference = one_step(make_module(loss_kwargs, local_loss), global_batch(), devices=1)
    for rank in range(WORLD):
        result = torch.load(ddp_results / f"case{index}-rank{rank}.pt")
        torch.testing.assert_close(result["loss"], reference["loss"], rtol=1e-5, atol=1e-6)
        assert torch.equal(result["distill"], reference["distill"]), "D differs between the ranks and one process"
        full = (WORLD * PER_RANK) // 2  # alpha · N; outscored takes only the pairs past its margin, at least one here
        assert (
            loss_kwargs["alpha_max"] == 0
            or result["distill"].sum() == full
            or (loss_kwargs.get("subset") in ("outscored", "memory") and 0 < result["distill"].sum() <= full)
        )
        assert result["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            assert grad.abs().max() > 0 or name == "logit_scale", f"{name}: zero gradient, the test cannot tell"
            torch.testing.assert_close(
                result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
            )
        # after the AdamW step (lr 1e-3; eps 1e-4 above gradient rounding: its first step ~ lr·g/(|g| + eps) would
        # otherwise turn a 1e-8 rounding difference in a ~1e-7 gradient into a 1e-5 weight difference)
        for name, value in reference["rule"].items():  # the pair memory is the same on every rank
            torch.testing.assert_close(result["rule"][name], value, rtol=1e-3, atol=1e-3)
        assert loss_kwargs.get("subset") != "memory" or reference["rule"]["memory.sightings"].sum() == WORLD * PER_RANK
        for group in ("weights", "teacher"):  # the EMA teacher agrees on every rank
            for name, value in reference[group].items():
                torch.testing.assert_close(result[group][name], value, rtol=1e-4, atol=1e-5)
