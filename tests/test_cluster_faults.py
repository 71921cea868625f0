"""What a cluster does to a long job (issue 23): a rank dies or hangs, the whole job is cancelled, SLURM pre-empts and
requeues it, the disk fills up during a checkpoint write, remote shards fail now and then, W&B is unreachable.

Ranks are started separately, as srun and torchrun start them; signals and kills go to real subprocesses, each in
its own session, and every one is killed with its children when a test ends, passed or not. Only loopback addresses.
"""

import json
import os
import re
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from psdclip.data import ShardDataModule
from psdclip.data.samples import COUNTERS
from psdclip.run.checkpoint_files import resolve_ckpt_path
from psdclip.run.stopping import record_slurm_run
from tests.conftest import tiny_run_overrides
from tests.helpers.processes import checkout_env, child, free_port, run_in_session, separate_ranks
from tests.helpers.shard_sets import run_rank, tokenizer, transform, write_set
from tests.test_faults import run_folder, save, step_of, train_command


def long_run(fashion_mnist_dir: Path, tmp_path: Path, *overrides: str) -> list[str]:
    """A run of 200 steps that logs every step, to be stopped part-way; all ranks share one run folder."""
    return train_command(
        fashion_mnist_dir,
        tmp_path / "cache",
        tmp_path / "logs",
        "trainer.max_steps=200",
        "callbacks.model_checkpoint.every_n_train_steps=100",
        "trainer.enable_progress_bar=true",
        "callbacks.progress.style=log",
        "callbacks.progress.every_n_steps=1",
        *overrides,
    )


def ddp_run(fashion_mnist_dir: Path, tmp_path: Path, *overrides: str) -> list[str]:
    return long_run(fashion_mnist_dir, tmp_path, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'run'}", *overrides)


# ---- 1. a rank dies -------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_lost_rank_ends_every_survivor_with_one_line(fashion_mnist_dir, tmp_path, fault):
    """killed: kill -9, its connections reset; frozen: SIGSTOP, as a dead node whose connections stay open, which only
    the process group's timeout (``trainer.strategy.timeout``) ends."""
    command = ddp_run(fashion_mnist_dir, tmp_path, "trainer.strategy.timeout.seconds=15")
    with separate_ranks(command) as (rank0, rank1):
        rank0.wait_for(r"step 3/200", timeout=300)
        os.killpg(rank1.process.pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        lost = time.monotonic()
        rc = rank0.finish(timeout=90)
        waited = time.monotonic() - lost
    assert rc == 1, rank0.output[-3000:]
    line = re.search(r"rank 0: (.+) failed after step \d+, likely a lost rank.*ckpt_path=last", rank0.output)
    assert line, rank0.output[-3000:]
    assert "Traceback" not in rank0.output
    assert 14 <= waited < 45 if fault == "frozen" else waited < 30  # frozen: the 15 s timeout, not a reset, ends it


# ---- 2. the whole job is cancelled or pre-empted --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("signalled", ["every rank", "rank 1 only"])
def test_sigterm_stops_every_rank_at_one_step_with_one_checkpoint(fashion_mnist_dir, tmp_path, signalled):
    """``every rank``: as scancel and a pre-emption do, each rank at its own moment (here rank 1 about a step before
    rank 0); ``rank 1 only``: the others learn it at the next step's end."""
    with separate_ranks(ddp_run(fashion_mnist_dir, tmp_path)) as ranks:
        ranks[0].wait_for(r"step 3/200", timeout=300)
        os.killpg(ranks[1].process.pid, signal.SIGTERM)
        if signalled == "every rank":
            time.sleep(0.5)
            os.killpg(ranks[0].process.pid, signal.SIGTERM)
        rcs = [rank.finish(timeout=60) for rank in ranks]
    assert rcs == [143, 143], ranks[0].output[-2000:] + ranks[1].output[-2000:]
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+): saved", ranks[0].output)[1])
    assert int(re.search(r"rank 1 stopped by SIGTERM at step (\d+)", ranks[1].output)[1]) == stopped
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [path.name for path in checkpoints.iterdir()] == ["last.ckpt"] and step_of(
        checkpoints / "last.ckpt"
    ) == stopped


# ---- 3. SLURM pre-emption with requeue ------------------------------------------------------------------------------
def slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A single-task SLURM batch job's environment, with a stand-in ``scontrol`` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol_calls"}\n')
    scontrol.chmod(0o755)
    return checkout_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="psdclip",
        SLURM_NTASKS="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        **extra,
    )


@pytest.mark.slow
def test_slurm_warning_signal_checkpoints_requeues_and_the_requeued_job_resumes(fashion_mnist_dir, tmp_path):
    command = long_run(fashion_mnist_dir, tmp_path)
    with child(command, slurm_env(tmp_path)) as run:
        run.wait_for(r"step 4/200", timeout=300)
        run.process.send_signal(signal.SIGUSR1)  # sbatch --signal=SIGUSR1@90
        rc = run.finish(timeout=60)
    assert rc == 128 + signal.SIGUSR1, run.output[-3000:]
    stopped = int(re.search(r"stopped by SIGUSR1 at step (\d+): saved \S+; requeued SLURM job 4242", run.output)[1])
    last = run_folder(tmp_path / "logs") / "checkpoints" / "last.ckpt"
    assert step_of(last) == stopped and (tmp_path / "scontrol_calls").read_text() == "requeue 4242\n"
    assert not list((tmp_path / "logs").glob("**/hpc_ckpt_*")), "Lightning's own checkpoint was written"

    # SLURM starts the same command again, as the same job; no ckpt_path is given
    with child(command, slurm_env(tmp_path, SLURM_RESTART_COUNT="1")) as requeued:
        requeued.wait_for(rf"requeued SLURM job 4242 resumes from {re.escape(str(last))}", timeout=300)
        requeued.wait_for(rf"step {stopped + 1}/200", timeout=120)


def test_a_requeued_job_resumes_from_the_newest_complete_checkpoint_of_its_earlier_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    first, second = (tmp_path / "train" / "runs" / name for name in ("first", "second"))
    for folder in (first, second):
        record_slurm_run(str(tmp_path), "train", str(folder))
    good = save(first / "checkpoints" / "last.ckpt", 10, 1000)
    torn = save(second / "checkpoints" / "last.ckpt", 20, 2000)
    torn.write_bytes(torn.read_bytes()[:-300])  # the second start was killed while writing
    other_run = save(tmp_path / "train" / "runs" / "another_job" / "checkpoints" / "last.ckpt", 30, 3000)
    assert resolve_ckpt_path(None, str(tmp_path), "train") is None  # a first start resumes nothing
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert resolve_ckpt_path(None, str(tmp_path), "train") == str(good) != str(other_run)


# ---- 4. the disk fills up during a checkpoint write ----------------------------------------------------------------
DISK_FILLS_UP = textwrap.dedent("""
    import builtins, errno, runpy, sys

    real_open, checkpoint_writes = builtins.open, []

    class FillsUp:
        \"\"\"A file on a disk that fills up half-way through the first write.\"\"\"

        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(bytes(data)[: len(data) // 2])
            self.file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    def open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if str(file).endswith(".partial") and "w" in mode:
            checkpoint_writes.append(file)
            if len(checkpoint_writes) > 1:  # the first checkpoint fits
                return FillsUp(handle)
        return handle

    builtins.open = open
    sys.argv[0] = "train.py"
    runpy.run_path("train.py", run_name="__main__")
""")


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_write_keeps_the_last_one_and_stops_saying_where(fashion_mnist_dir, tmp_path):
    command = long_run(fashion_mnist_dir, tmp_path, "callbacks.model_checkpoint.every_n_train_steps=2")
    done = run_in_session([sys.executable, "-c", DISK_FILLS_UP, *command[2:]], timeout=300)
    assert done.returncode == 1, done.stdout[-3000:]
    checkpoints = run_folder(tmp_path / "logs") / "checkpoints"
    last = checkpoints / "last.ckpt"
    message = re.search(
        r"stopped at step 4: disk full: writing the checkpoint (\S+) failed \(No space left", done.stdout
    )
    assert message and message[1] == str(last), done.stdout[-3000:]
    assert "the previous last.ckpt is intact" in done.stdout and "Traceback" not in done.stdout
    assert step_of(last) == 2 and [path.name for path in checkpoints.iterdir()] == ["last.ckpt"]


# ---- 5. remote shards that fail now and then -----------------------------------------------------------------------
FLAKY_PIPE = """#!/bin/sh
# $1: a shard; $2: once = its first try anywhere fails (mkdir is atomic), always = every try fails, else none
case "$2" in
  always) exit 1 ;;
  once) mkdir "$1.failed" 2>/dev/null && exit 1 ;;
esac
exec cat "$1"
"""


def test_flaky_remote_shards_are_retried_and_a_dead_one_is_skipped_counted_and_named_once(tmp_path, caplog):
    ids = write_set(tmp_path / "shards", [8] * 8)  # 64 samples: 2 ranks × 4 batches of 8
    script = tmp_path / "flaky.sh"
    script.write_text(FLAKY_PIPE)
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    modes = ["once", "fine", "once", "fine", "once", "fine", "once", "always"]
    urls = [f"pipe:sh {script} {shard} {mode}" for shard, mode in zip(shards, modes)]
    dm = ShardDataModule(
        urls,
        train_num_samples=64,
        batch_size=8,
        num_workers=2,
        shuffle_buffer=16,
        shard_retries=2,
        retry_wait_s=0.05,
        transform=transform,
        tokenizer=tokenizer,
    )
    ranks, counts = [], 0
    for rank in range(2):  # each rank's stream through 2 DataLoader worker processes
        batches, carried = run_rank(dm.stream(rank, 2))
        ranks.append(batches)
        counts = counts + carried
    assert all((shard.parent / f"{shard.name}.failed").is_dir() for shard, mode in zip(shards, modes) if mode == "once")
    assert dict(zip(COUNTERS, counts.tolist())) == {**dict.fromkeys(COUNTERS, 0), "shard_unreadable": 1, "refilled": 8}
    assert caplog.text.count(f"skipping shard unreadable in shard {urls[-1]}") == 1 and "tried 3 times" in caplog.text
    assert [len(batches) for batches in ranks] == [4, 4] and all(len(batch) == 8 for b in ranks for batch in b)
    dead = set(ids[-8:])
    seen = {i for batches in ranks for batch in batches for i in batch}
    assert seen == set(ids) - dead  # every sample of the flaky shards arrived; the dead shard's place was refilled


# ---- 6. W&B unreachable ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_unreachable_wandb_server_logs_offline_and_trains(fashion_mnist_dir, tmp_path):
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there: every connection is refused
    env = checkout_env(
        WANDB_MODE="online",
        WANDB_BASE_URL=refused,
        WANDB_API_KEY="0" * 40,  # logged in, so that wandb tries the server rather than asking for a key
        WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb_data"),
    )
    command = [sys.executable, "train.py", *tiny_run_overrides(fashion_mnist_dir, tmp_path), "logger=wandb"]
    started = time.monotonic()
    done = run_in_session([*command, "trainer.max_steps=3"], timeout=240, env=env)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:]
    line = re.search(
        r"W&B server (\S+) unreachable: .*logging offline instead: upload later with `wandb sync (\S+)`", done.stdout
    )
    assert line and line[1] == refused, done.stdout[-3000:]
    assert list(Path(line[2]).parent.glob("offline-run-*")), "no offline run to sync"
    assert json.loads((run_folder(tmp_path / "logs") / "summary.json").read_text())["steps"] == 3
    assert took < 180, f"took {took:.0f} s"
