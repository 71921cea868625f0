"""Never lose a run: multi-process runs end, weights are saved before evaluation, SIGTERM saves and stops, resumes
pick the newest complete checkpoint, and concurrent runs get their own folders (issue 12, items 0-4).

Signals and kills go to real subprocesses, each in its own session; every one is killed with its children when a
test ends, passed or not.
"""

import json
import os
import re
import signal
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from psdclip.data.embedded import FashionMNISTShards
from psdclip.models import read_checkpoint
from psdclip.run.checkpoint_files import IncompleteCheckpointError, resolve_ckpt_path
from psdclip.training import SIGTERM_EXIT, train
from tests.conftest import compose_config, make_fashion_mnist
from tests.helpers.processes import Child, child, kill_session

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(scope="module")
def two_shard_eval_data(tmp_path_factory) -> tuple[Path, Path]:
    """Fashion-MNIST-format files whose test split fills two evaluation shards (5000 + 1 images), its shards built.

    Retrieval captions cover the first 1000 test images, so under DDP rank 1 (the second shard) encodes no caption.
    """
    root = tmp_path_factory.mktemp("two_shard")
    source = make_fashion_mnist(root / "fashion", train=320, test=5001)
    FashionMNISTShards("test", str(source), str(root / "cache")).ensure()
    return source, root / "cache"


def train_command(source: Path, cache: Path, log_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        f"paths.fashion_mnist_dir={source}",
        f"paths.cache_dir={cache}",
        f"paths.log_dir={log_dir}",
        "data.batch_size=32",
        "data.num_workers=0",
        "data.shard_size=100",
        "trainer.enable_progress_bar=false",
        "evaluation.batch_size=500",
        "callbacks.media.examples=50",
        *overrides,
    ]


def run_folder(log_dir: Path) -> Path:
    (folder,) = (log_dir / "train" / "runs").iterdir()
    return folder


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


# ---- 0. multi-process training ends ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_cpu_run_of_the_default_config_finishes_with_evaluation(two_shard_eval_data, tmp_path):
    source, cache = two_shard_eval_data
    with child(train_command(source, cache, tmp_path / "logs", "trainer=ddp_cpu", "trainer.max_steps=2")) as run:
        rc = run.finish(timeout=300)  # measured about 60 s on 2 busy cores; a hang never ends
        assert rc == 0, run.output[-3000:]
    folder = run_folder(tmp_path / "logs")
    results = json.loads((folder / "eval_results.json").read_text())["metrics"]
    assert (
        0 <= results["eval/fashion_mnist/zeroshot_top1"] <= 1 and "eval/fashion_mnist/retrieval_mean_recall" in results
    )
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["zeroshot_top1"] == results["eval/fashion_mnist/zeroshot_top1"]
    assert step_of(folder / "checkpoints" / "last.ckpt") == 2


# ---- 1. an evaluation error never costs the weights -----------------------------------------------------------------
@pytest.mark.slow
def test_failing_final_evaluation_keeps_the_last_checkpoint(train_cfg, tmp_path, fashion_mnist_dir):
    test_split = FashionMNISTShards("test", str(fashion_mnist_dir), str(tmp_path / "cache"))
    test_split.ensure()
    (shard,) = test_split.directory.glob("*.tar")
    shard.write_bytes(b"not a tar file" * 100)  # the evaluation set the run reads at its end
    with pytest.raises(tarfile.ReadError, match=shard.name):
        train(train_cfg("trainer.max_steps=3"))
    assert step_of(tmp_path / "run" / "checkpoints" / "last.ckpt") == 3


def test_default_run_checkpoints_at_least_once_per_epoch():
    cfg = compose_config([])
    steps_per_epoch = 60000 // cfg.data.batch_size  # Fashion-MNIST's training split
    assert cfg.callbacks.model_checkpoint.every_n_train_steps <= steps_per_epoch


# ---- 2. SIGTERM: checkpoint, stop, non-zero exit, how to resume -----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("target", ["process", "group"])
def test_sigterm_during_training_saves_the_current_step_and_exits_non_zero(fashion_mnist_dir, tmp_path, target):
    """``group``: as SLURM, Kubernetes and ``timeout`` do, the signal also reaches the data workers."""
    command = train_command(
        fashion_mnist_dir,
        tmp_path / "cache",
        tmp_path / "logs",
        f"data.num_workers={2 if target == 'group' else 0}",
        "trainer.max_steps=200",
        "callbacks.model_checkpoint.every_n_train_steps=10",
        "trainer.enable_progress_bar=true",
        "callbacks.progress.style=log",
        "callbacks.progress.every_n_steps=1",
    )
    with child(command) as run:
        run.wait_for(r"step 12/200", timeout=300)
        if target == "group":
            os.killpg(run.process.pid, signal.SIGTERM)
        else:
            run.process.send_signal(signal.SIGTERM)
        rc = run.finish(timeout=60)
    assert rc == SIGTERM_EXIT, run.output[-3000:]
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+)", run.output)[1])
    last = run_folder(tmp_path / "logs") / "checkpoints" / "last.ckpt"
    assert 12 <= stopped < 200 and step_of(last) == stopped
    assert f"ckpt_path={last}" in run.output
    assert not (last.parent.parent / "eval_results.json").exists()


@pytest.mark.slow
def test_sigterm_during_final_evaluation_stops_it(two_shard_eval_data, tmp_path):
    source, cache = two_shard_eval_data
    # one image per batch: an evaluation of minutes, which the signal must cut short
    command = train_command(source, cache, tmp_path / "logs", "trainer.max_steps=2", "evaluation.batch_size=1")
    with child(command) as run:
        run.wait_for(r"`max_steps=2` reached", timeout=300)
        time.sleep(2)
        run.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        rc = run.finish(timeout=120)
        waited = time.monotonic() - signalled
    folder = run_folder(tmp_path / "logs")
    assert rc == SIGTERM_EXIT, run.output[-3000:]
    assert not (folder / "eval_results.json").exists(), "the evaluation ran to its end"
    assert step_of(folder / "checkpoints" / "last.ckpt") == 2 and "ckpt_path=" in run.output
    assert waited < 30, f"took {waited:.0f} s to stop"


# ---- 3. resume from the newest complete checkpoint --------------------------------------------------------------------
KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from psdclip.run.checkpoint_files import AtomicCheckpointIO

    class KilledMidWrite(AtomicCheckpointIO):
        def write(self, checkpoint, path):
            with open(path, "wb") as f:
                f.write(b"PK" + bytes(4096))  # the first bytes of a zip archive reach the disk...
            print("writing", flush=True)
            time.sleep(600)  # ...and the job is killed before the rest

    KilledMidWrite().save_checkpoint({"global_step": 30}, sys.argv[1])
""")


def save(path: Path, step: int, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "weights": torch.arange(100.0)}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_kill_during_last_write_resumes_from_the_newer_step_checkpoint(tmp_path):
    folder = tmp_path / "train" / "runs" / "a" / "checkpoints"
    last = save(folder / "last.ckpt", 10, 1000)
    newer = save(folder / "step_0000020.ckpt", 20, 2000)
    with child([sys.executable, "-c", KILLED_WRITER, str(last)]) as writer:
        writer.wait_for("writing", timeout=120)
        os.killpg(writer.process.pid, signal.SIGKILL)  # killed mid-write, as by the OOM killer or SIGKILL
        writer.process.wait()
    (partial,) = folder.glob(".*.partial")
    alive = folder / f".last.ckpt.{os.getpid()}.partial"  # a write still in progress (this process is alive)
    alive.write_bytes(b"")

    assert resolve_ckpt_path("last", str(tmp_path), "train") == str(newer)
    assert step_of(last) == 10  # the old last.ckpt survived
    assert not partial.exists() and alive.exists()


def test_truncated_checkpoint_is_named_and_the_newest_good_one_offered(tmp_path):
    folder = tmp_path / "train" / "runs" / "a" / "checkpoints"
    good = save(folder / "step_0000020.ckpt", 20, 1000)
    save(folder / "step_0000010.ckpt", 10, 500)
    last = save(folder / "last.ckpt", 30, 2000)
    last.write_bytes(last.read_bytes()[:-300])  # truncated: the zip directory at its end is gone
    os.utime(last, (2000, 2000))

    with pytest.raises(IncompleteCheckpointError) as error:
        resolve_ckpt_path(str(last), str(tmp_path), "train")
    assert str(last) in str(error.value) and f"ckpt_path={good}" in str(error.value)
    with pytest.raises(IncompleteCheckpointError, match=str(good)):  # evaluate.py, export and the audit read it so
        read_checkpoint(last)
    assert resolve_ckpt_path("last", str(tmp_path), "train") == str(good)


# ---- 4. one folder per run ------------------------------------------------------------------------------------------
RUN_DIRS = textwrap.dedent("""
    import os, sys
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    import psdclip  # noqa: F401  (registers the run-folder resolver, as train.py's imports do)

    with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=["paths.log_dir=/logs"])
        # both processes start "in the same second"
        OmegaConf.register_new_resolver("now", lambda pattern: "2026-01-01_00-00-00", replace=True)
        print(os.getpid(), cfg.hydra.run.dir, cfg.hydra.sweep.dir)
""")


def test_runs_started_in_the_same_second_get_their_own_folders():
    runs = [Child([sys.executable, "-c", RUN_DIRS, str(CONF)]) for _ in range(2)]
    try:
        for run in runs:
            assert run.finish(timeout=120) == 0, run.output[-3000:]
        (pid_a, run_a, sweep_a), (pid_b, run_b, sweep_b) = (run.output.split()[-3:] for run in runs)
    finally:
        for run in runs:
            kill_session(run.process)
    assert run_a != run_b and sweep_a != sweep_b
    assert run_a.endswith(pid_a) and sweep_b.endswith(pid_b) and "2026-01-01_00-00-00" in run_a
