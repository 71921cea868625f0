"""A DDP step on 2 CPU processes (gloo) equals one process on the concatenated batch: loss, gradients, weights, EMA,
and D's epoch diagnostics; a DDP run logs nothing Lightning asks to sync."""

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy

from tests.conftest import tiny_run_overrides
from tests.helpers.losses import EMA_OUTSCORED
from tests.helpers.one_step import global_batch as batch_of
from tests.helpers.one_step import make_module, one_step
from tests.helpers.processes import checkout_env, free_port, join_ranks_as, run_in_session

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
        # D's epoch diagnostics sum both ranks' counts: the global batch's, not a rank's own
        assert result["epoch"].keys() == reference["epoch"].keys()
        for name, value in reference["epoch"].items():
            assert torch.equal(result["epoch"][name], value), name
    marks, chosen = global_batch()[2], reference["distill"]
    marked, corrupted = marks >= 0, marks == 1
    by_hand = {  # (numerator, denominator); a ratio whose denominator is 0 is not logged
        "train/batch_noise_epoch": (corrupted.sum(), marked.sum()),
        "train/distill_precision_epoch": ((chosen & corrupted).sum(), (chosen & marked).sum()),
        "train/distill_recall_epoch": ((chosen & corrupted).sum(), corrupted.sum()),
    }
    assert reference["epoch"] == {name: n / d for name, (n, d) in by_hand.items() if d > 0}


@pytest.mark.slow
def test_a_ddp_run_logs_every_epoch_figure_synced(fashion_mnist_dir, tmp_path):
    """Two 2-rank epochs with noisy captions, the pair memory and the default callbacks: D's diagnostics, the memory's
    statistics and the data stream's counts are logged, Lightning never asks for ``sync_dist``, and the progress lines
    (which read those values on rank 0, after every rank has reduced them) do not hang an epoch's end."""
    command = [
        sys.executable,
        "train.py",
        *tiny_run_overrides(fashion_mnist_dir, tmp_path),
        "trainer=ddp_cpu",
        "loss=psd_memory",
        "loss.subset.min_sightings=1",  # a noise estimate after the first epoch
        "data.shard_size=100",
        "trainer.max_steps=-1",  # whole epochs
        "trainer.max_epochs=2",
        "callbacks.progress.style=log",
        "trainer.strategy.timeout.seconds=120",  # a rank waiting alone fails the run within the test's time
    ]
    run = run_in_session(command, timeout=600, env=checkout_env(OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-3000:]
    (folder,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    logs = run.stdout + "".join(log.read_text() for log in folder.glob("*.log"))
    assert "sync_dist" not in logs, [line for line in logs.splitlines() if "sync_dist" in line]
    ends = [line for line in run.stdout.splitlines() if "(epoch end)" in line]
    # each epoch's line, the second showing the noise estimate the first epoch ended with
    assert [("Epoch 1/2" in line, "Epoch 2/2" in line, "noise_estimate" in line) for line in ends] == [
        (True, False, False),
        (False, True, True),
    ], run.stdout[-3000:]
    logged = (folder / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/batch_noise_epoch", "train/noise_threshold", "data/refilled"} <= set(logged)
