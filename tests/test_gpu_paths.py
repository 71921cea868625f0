"""Every code path a GPU run takes that a CPU can take too: DDP with the GPU strategy's settings (static graph,
gradients as bucket views) and micro-batches, loss scaling under 16-mixed with micro-batches, bf16, torch.compile,
gradient checkpointing, and resuming a checkpoint on another number of ranks. ``bench/device_check.sh`` runs the same
paths on a GPU."""

import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy

from psdclip.callbacks.checkpointing import ResumableCheckpoint, rng_states
from psdclip.training import train
from tests.helpers.losses import EMA_OUTSCORED
from tests.helpers.one_step import global_batch, make_module, one_step, train_steps
from tests.helpers.processes import join_ranks_as, run_in_session
from tests.test_scale_ddp import free_port

WORLD, PER_RANK, STEPS = 2, 8, 3
# conf/trainer/ddp.yaml's DDP settings, over gloo
GPU_DDP_SETTINGS = {"static_graph": True, "gradient_as_bucket_view": True, "find_unused_parameters": False}


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [global_batch(WORLD * PER_RANK, seed=step) for step in range(STEPS)]


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    join_ranks_as(rank, WORLD, port)
    torch.set_num_threads(1)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    result = train_steps(
        make_module(EMA_OUTSCORED, micro_batches=2),
        [(images[rows], texts[rows]) for images, texts in batches()],
        devices=WORLD,
        strategy=DDPStrategy(process_group_backend="gloo", **GPU_DDP_SETTINGS),
    )
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_micro_batches_under_static_graph_ddp_take_the_single_process_steps(tmp_path):
    """Two ranks, each computing its half of the global batch in 2 pieces, over 3 steps = one process on the whole
    batches at once. DDP's first static-graph iteration used to fail (reducer.cpp: expect_autograd_hooks_)."""
    mp.start_processes(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    torch.set_num_threads(1)
    reference = train_steps(make_module(EMA_OUTSCORED), batches(), devices=1)
    assert reference["distill"].sum() > 0 and reference["teacher"]
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], reference["loss"], rtol=1e-5, atol=1e-6)
        assert torch.equal(result["distill"], reference["distill"])
        for name, grad in reference["grads"].items():  # the third step's, as the optimiser saw them
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        for group in ("weights", "teacher"):
            for name, value in reference[group].items():
                torch.testing.assert_close(result[group][name], value, rtol=1e-4, atol=1e-5, msg=f"{group} {name}")


def fp16_step(micro_batches: int) -> tuple[dict, float]:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    result = one_step(make_module(EMA_OUTSCORED, micro_batches=micro_batches), global_batch(16), plugins=[precision])
    return result, scaler.get_scale()


def test_fp16_micro_batches_scale_the_whole_backward_pass():
    """16-mixed: the loss is scaled before the one backward pass, so the features' gradients are scaled as the weights'
    are (the old per-piece surrogate took unscaled fp16 feature gradients); the step equals the whole batch's, in fp16
    and in fp32, up to fp16's rounding (relative to each gradient's norm: small entries round coarsely)."""
    torch.set_num_threads(1)
    whole, _ = fp16_step(1)
    pieces, scale = fp16_step(2)
    exact = one_step(make_module(EMA_OUTSCORED), global_batch(16))
    assert scale == 2.0**16  # no overflow: the step was taken, not skipped by the scaler
    for name, grad in exact["grads"].items():
        assert grad.abs().max() > 0, name
        for reference in (whole["grads"][name], grad):
            error = (pieces["grads"][name] - reference).norm() / reference.norm()
            assert error < 1e-2, f"{name}: relative error {error:.2e}"


def finite_losses(run_dir: Path) -> list[float]:
    log = pd.read_csv(run_dir / "csv" / "metrics.csv")
    losses = log["train/loss"].dropna().tolist()
    assert losses and all(math.isfinite(loss) for loss in losses), losses
    return losses


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [["trainer.precision=bf16-mixed"], ["model.compile=true"], ["model.grad_checkpointing=true"]],
    ids=["bf16", "compile", "grad-checkpointing"],
)
def test_gpu_settings_train_end_to_end(train_cfg, tmp_path, overrides):
    train(train_cfg("trainer.max_steps=3", "~callbacks.evaluation", "~callbacks.media", *overrides))
    assert len(finite_losses(tmp_path / "run")) == 3


def train_py(fashion_mnist_dir: Path, log_dir: Path, *overrides: str) -> Path:
    """A tiny ``python train.py`` run in its own session (DDP ranks die with it); its run folder."""
    command = [
        sys.executable,
        "train.py",
        f"paths.fashion_mnist_dir={fashion_mnist_dir}",
        f"paths.cache_dir={log_dir.parent / 'cache'}",
        f"paths.log_dir={log_dir}",
        "debug=tiny",
        "data.batch_size=16",
        "data.shard_size=100",
        "trainer.enable_progress_bar=false",
        "~callbacks.evaluation",
        "~callbacks.media",
        *overrides,
    ]
    done = run_in_session(command, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    return max((log_dir / "train" / "runs").iterdir(), key=lambda folder: folder.stat().st_mtime)


# 2 ranks with the GPU strategy's DDP settings and micro-batches, as trainer=ddp runs them on GPUs
DDP_RANKS = [
    "trainer=ddp_cpu",
    *(f"+trainer.strategy.{name}={str(value).lower()}" for name, value in GPU_DDP_SETTINGS.items() if value),
    "optim.micro_batches=2",
]
ONE_RANK = ["trainer=cpu"]


@pytest.mark.slow
def test_resume_on_another_number_of_ranks(fashion_mnist_dir, tmp_path):
    """2 ranks (static-graph DDP, micro-batches) → resumed on 1 → resumed on 2 again: each rank restores its own
    RNG states where the checkpoint has them, and any number of ranks resumes."""
    log_dir, checkpoint = tmp_path / "logs", None
    for steps, ranks in ((2, DDP_RANKS), (3, ONE_RANK), (4, DDP_RANKS)):
        resume = [f"ckpt_path={checkpoint}"] if checkpoint else []
        run = train_py(fashion_mnist_dir, log_dir, *ranks, f"trainer.max_steps={steps}", *resume)
        checkpoint = run / "checkpoints" / "last.ckpt"
        saved = torch.load(checkpoint, weights_only=True)
        assert saved["global_step"] == steps
        assert len(saved["rng_states"]["ranks"]) == (WORLD if ranks is DDP_RANKS else 1)  # one state per rank
        finite_losses(run)


@pytest.mark.parametrize("saved_ranks,rank,restored", [(2, 1, 1), (2, 0, 0), (1, 1, 0), (8, 3, 3)])
def test_each_rank_restores_its_own_rng_state_or_rank_0s(saved_ranks, rank, restored):
    """A checkpoint of ``saved_ranks`` ranks resumed as rank ``rank``: its own torch state, else rank 0's."""
    states = []
    for index in range(saved_ranks):
        torch.manual_seed(100 + index)
        states.append(rng_states())
    trainer = SimpleNamespace(world_size=max(saved_ranks, rank + 1), global_rank=rank, is_global_zero=rank == 0)
    torch.manual_seed(0)
    ResumableCheckpoint().on_load_checkpoint(trainer, None, {"rng_states": {"ranks": states}})
    assert torch.equal(torch.get_rng_state(), states[restored]["torch"])


def test_an_older_checkpoint_with_rank_0s_states_still_restores():
    torch.manual_seed(7)
    old_format = {**rng_states(), "cuda": []}  # rank 0's states, every device's CUDA state as a list
    expected = torch.rand(3)
    trainer = SimpleNamespace(world_size=1, global_rank=0, is_global_zero=True)
    ResumableCheckpoint().on_load_checkpoint(trainer, None, {"rng_states": old_format})
    assert torch.equal(torch.rand(3), expected)
