"""Sweeps whose jobs train on several ranks (issue 40, parts 3 and 4): with Hydra's basic launcher each job runs on its
own DDP ranks, not a copy of the sweep; with submitit each task of a job is one rank; a job that fails on one rank
fails alone and the sweep goes on; the summary is printed once; no process outlives the command.

Sweeps run as real subprocesses, each in its own session: a test checks that nothing of it is left when it returns,
and kills whatever is when it ends, passed or not.
"""

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from omegaconf import OmegaConf

from psdclip.run.jobs import FAILURE_FILE, join_as_rank
from tests.conftest import compose_config, tiny_run_overrides
from tests.helpers.processes import checkout_env, child, left_in_session
from tests.test_faults import step_of

HELPERS = "tests.helpers.sweep_jobs"


def sweep_command(fashion_mnist_dir: Path, tmp_path: Path, *overrides: str) -> list[str]:
    """``train.py -m`` of one-step jobs on 2 CPU ranks, each rank noting what it ran (``NoteSweepJob``)."""
    return [
        sys.executable,
        "train.py",
        "-m",
        *tiny_run_overrides(fashion_mnist_dir, tmp_path),
        "trainer=ddp_cpu",
        "trainer.max_steps=1",
        "trainer.enable_progress_bar=false",
        "~callbacks.evaluation",
        "optimized_metric=train/loss",  # measured without an evaluation
        "logger=wandb",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"+callbacks.note._target_={HELPERS}.NoteSweepJob",
        "+callbacks.note.setting='${loss.alpha_max}'",
        *overrides,
    ]


def failing_on_rank_1(value: str, failing_value: str) -> list[str]:
    return [
        f"+callbacks.fail_on_rank._target_={HELPERS}.FailOnRank",
        "+callbacks.fail_on_rank.rank=1",
        f"+callbacks.fail_on_rank.value='{value}'",
        f"+callbacks.fail_on_rank.failing_value={failing_value}",
    ]


def wandb_env(tmp_path: Path) -> dict[str, str]:
    return checkout_env(
        WANDB_MODE="offline",
        WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb_data"),
        OMP_NUM_THREADS="1",
    )


def run_sweep(command: list[str], env: dict[str, str], timeout: float) -> str:
    """The sweep's output, once it has ended with 0 and left no process behind."""
    with child(command, env) as sweep:
        rc = sweep.finish(timeout)
        left = left_in_session(sweep.process.pid)
    assert rc == 0, sweep.output[-4000:]
    assert not left, f"left running: {left}"
    return sweep.output


def notes(job: Path) -> dict[int, dict]:
    """What each rank of a job noted (``NoteSweepJob``), by rank."""
    return {int(path.stem[4:]): json.loads(path.read_text()) for path in job.glob("rank*.json")}


def ran_the_job_on_both_ranks(job: Path, alpha_max: str, group: str) -> None:
    ranks = notes(job)
    assert sorted(ranks) == [0, 1] and all(note["world_size"] == 2 for note in ranks.values()), ranks
    assert all(str(note["setting"]) == alpha_max and note["group"] == group for note in ranks.values()), ranks
    assert ranks[0]["name"] == ranks[1]["name"] and ranks[0]["wandb_group"] == group, ranks


@pytest.mark.slow
def test_a_ddp_sweep_runs_each_job_on_its_ranks_and_a_job_failing_on_rank_1_fails_alone(fashion_mnist_dir, tmp_path):
    """Basic launcher: Lightning's rank 1 runs the job's own config (not the sweep), the job with alpha_max=0.5 fails
    on rank 1 and on rank 0 with it, and the sweep goes on to its summary, printed once."""
    sweep = tmp_path / "sweep"
    command = sweep_command(
        fashion_mnist_dir, tmp_path, "loss.alpha_max=0.5,0", *failing_on_rank_1("${loss.alpha_max}", "0.5")
    )
    output = run_sweep(command, wandb_env(tmp_path), timeout=400)
    assert output.count("Launching 2 jobs locally") == 1 and output.count("Multirun summary") == 1, output[-4000:]
    assert "rank 1 fails on purpose" in output
    assert re.search(r"rank 0: .* failed after step \d+, likely a lost rank", output), output[-4000:]
    assert f"error: sweep job 0 failed: exit status 1 ({sweep / '0'})" in output

    failure = json.loads((sweep / "0" / FAILURE_FILE).read_text())
    assert failure["error"] == "exit status 1" and "loss.alpha_max=0.5" in failure["overrides"]
    assert not (sweep / "0" / "summary.json").exists()
    finished = json.loads((sweep / "1" / "summary.json").read_text())
    assert finished["alpha_max"] == 0 and finished["steps"] == 1
    assert [row.get("status") for row in json.loads((sweep / "summary.json").read_text())] == [None, "failed"]
    assert re.search(rf"failed: {sweep / '0'} \(.*loss.alpha_max=0.5.*\): exit status 1", output), output[-2000:]
    ran_the_job_on_both_ranks(sweep / "1", "0", group="train-sweep")
    assert (sweep / "1" / "train_ddp_process_1.log").is_file()  # Lightning started rank 1, in the job's folder


@pytest.mark.slow
def test_an_optuna_sweep_marks_a_trial_failing_on_rank_1_failed_and_goes_on(fashion_mnist_dir, tmp_path):
    sweep = tmp_path / "sweep"
    command = sweep_command(
        fashion_mnist_dir,
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        *failing_on_rank_1("${hydra:job.num}", "0"),  # the first trial
    )
    output = run_sweep(command, wandb_env(tmp_path), timeout=400)
    assert output.count("Launching 1 jobs locally") == 2 and output.count("Multirun summary") == 1, output[-4000:]
    # whichever ends the job first: rank 0 on its lost peer (exit status 1) or, under load, Lightning's watchdog, which
    # kills the process that started the ranks once one has failed (SIGKILL)
    reason = re.search(r"error: sweep job 0 failed: (exit status 1|killed by SIGKILL) ", output)
    assert reason, output[-4000:]
    assert json.loads((sweep / "0" / FAILURE_FILE).read_text())["error"] == reason[1]
    assert "Multirun summary (1 runs, 1 failed" in output
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    trial = yaml.safe_load((sweep / "1" / ".hydra" / "overrides.yaml").read_text())
    assert f"loss.alpha_max={best.best_params['loss.alpha_max']}" in trial  # chosen from the trial that finished


@pytest.mark.slow
def test_sigterm_to_a_sweep_stops_its_running_job_at_a_checkpoint_and_ends_the_sweep(fashion_mnist_dir, tmp_path):
    """``kill <sweep>`` (not its job, which runs in a process group of its own): the job stops as any run does."""
    sweep = tmp_path / "sweep"
    command = sweep_command(fashion_mnist_dir, tmp_path, "loss.alpha_max=0,0.5", "trainer.max_steps=500")
    with child(command, wandb_env(tmp_path)) as run:
        deadline = time.monotonic() + 300
        while not (sweep / "0" / "rank0.json").exists():  # written when training starts
            assert run.process.poll() is None and time.monotonic() < deadline, run.output[-3000:]
            time.sleep(0.5)
        os.kill(run.process.pid, signal.SIGTERM)
        rc = run.finish(timeout=120)
        left = left_in_session(run.process.pid)
    assert rc == 128 + signal.SIGTERM, run.output[-3000:]
    assert not left, f"left running: {left}"
    step = int(re.search(r"stopped by SIGTERM at step (\d+): saved", run.output)[1])
    assert step < 500 and step_of(sweep / "0" / "checkpoints" / "last.ckpt") == step
    assert "Multirun summary" not in run.output and not (sweep / "1").exists()


@pytest.mark.slow
def test_a_submitit_local_sweep_runs_each_job_as_one_rank_per_task(fashion_mnist_dir, tmp_path):
    """``hydra/launcher=submitit_local``: each job's 2 tasks are its ranks 0 and 1; Lightning starts no process."""
    sweep = tmp_path / "sweep"
    command = sweep_command(fashion_mnist_dir, tmp_path, "hydra/launcher=submitit_local", "loss.alpha_max=0,0.5")
    output = run_sweep(command, wandb_env(tmp_path), timeout=400)
    assert output.count("Multirun summary (2 runs") == 1, output[-4000:]
    for job, alpha_max in (("0", "0"), ("1", "0.5")):
        assert json.loads((sweep / job / "summary.json").read_text())["alpha_max"] == float(alpha_max)
        ran_the_job_on_both_ranks(sweep / job, alpha_max, group="train-sweep")
        assert not list((sweep / job).glob("train_ddp_process_*.log"))  # no rank started by Lightning
    assert len(json.loads((sweep / "summary.json").read_text())) == 2


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/submitit_slurm' is validated")  # psdclip.run.jobs says why
def test_the_slurm_launcher_asks_for_one_task_and_gpu_per_rank_and_psdclip_s_requeue_signal(monkeypatch):
    monkeypatch.setenv("PSDCLIP_NUM_NODES", "4")
    for trainer, nodes, per_node in (("ddp_8gpu", 1, 8), ("ddp_multinode", 4, 8), ("gpu", 1, 1)):
        cfg = compose_config(["hydra/launcher=submitit_slurm", f"trainer={trainer}"])
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (nodes, per_node, per_node)
        # SLURM's warning signal is the one psdclip's stopping callback requeues on; submitit's own (USR2) is not sent
        requeue = f"{cfg.callbacks.stopping.requeue_signal}@{launcher['signal_delay_s']}"
        assert launcher["additional_parameters"] == {"signal": requeue, "requeue": True}
        assert launcher["max_num_timeout"] == 0 and launcher["array_parallelism"] == 256  # the plugin's settings too


@pytest.mark.parametrize("node,task", [(0, 3), (1, 13)])
def test_a_slurm_task_of_a_submitit_job_is_the_rank_lightning_s_slurm_environment_reads(monkeypatch, node, task):
    """Under SLURM Lightning reads the place from SLURM itself: it must be the one the task exported for torch."""
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "16",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_NODEID": str(node),
        "SLURM_PROCID": str(task),
        "SLURM_LOCALID": str(task % 8),
    }
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert join_as_rank() == task
    exported = {key: os.environ[key] for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR")}
    assert exported == {
        "RANK": str(task),
        "LOCAL_RANK": str(task % 8),
        "WORLD_SIZE": "16",
        "NODE_RANK": str(node),
        "MASTER_ADDR": "gpu07",
    }
    environment = SLURMEnvironment()
    assert SLURMEnvironment.detect() and environment.creates_processes_externally
    read = (environment.global_rank(), environment.local_rank(), environment.node_rank(), environment.world_size())
    assert read == (task, task % 8, node, 16)
    assert (environment.main_address, environment.main_port) == ("gpu07", int(os.environ["MASTER_PORT"]))
    # without SLURM (submitit_local), Lightning's default environment takes the task for a rank started outside
    assert LightningEnvironment().creates_processes_externally
