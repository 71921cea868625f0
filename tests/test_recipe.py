"""The two-stage recipe as one command (issue 41, item 1): ``python train.py recipe=audit_retrain`` trains, audits and
retrains in one run folder with one summary, on two DDP ranks; restarted after a kill in its second training, it
resumes that training and runs nothing finished again; a missing first checkpoint is one line.

Command-line runs are real subprocesses, each in its own session, killed with their children when a test ends.
"""

import json
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from psdclip.run.checkpoint_files import is_complete, load_checkpoint_file
from psdclip.run.recipe import STATE_FILE, resumable_folder
from tests.conftest import tiny_paths
from tests.helpers.processes import checkout_env, child, run_in_session

STEPS = 6


def recipe_command(fashion_mnist_dir: Path, tmp_path: Path) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "recipe=audit_retrain",
        "trainer=ddp_cpu",
        "debug=tiny",
        *tiny_paths(fashion_mnist_dir, tmp_path),
        "data.shard_size=100",
        "data.batch_size=16",  # per rank: a global batch of 32
        f"trainer.max_steps={STEPS}",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.media=null",
        "trainer.enable_progress_bar=false",
        "logger=[csv,wandb]",
        # a setting of the first stage alone: its memory rule decides after one sighting in this short run
        "recipe.first=['loss=psd_memory','loss.subset.min_sightings=1']",
    ]


def recipe_folder(tmp_path: Path) -> Path:
    (state,) = (tmp_path / "logs" / "audit_retrain").glob(f"runs/*/{STATE_FILE}")
    return state.parent


@pytest.mark.slow
def test_the_recipe_trains_audits_retrains_and_resumes_its_second_training(fashion_mnist_dir, tmp_path):
    command = recipe_command(fashion_mnist_dir, tmp_path)
    env = checkout_env(WANDB_MODE="offline", OMP_NUM_THREADS="1")
    with child(command, env) as first_start:
        first_start.wait_for(r"recipe stage second", timeout=600)
        folder = recipe_folder(tmp_path)
        checkpoint = folder / "second" / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 300
        while not is_complete(checkpoint) and time.monotonic() < deadline and first_start.process.poll() is None:
            time.sleep(0.2)
        killed_at = load_checkpoint_file(checkpoint)["global_step"]
    # the block's end killed the driver, both ranks of the second training and their workers (kill -9)
    assert 2 <= killed_at < STEPS
    first_summary = (folder / "first" / "summary.json").stat().st_mtime_ns

    done = run_in_session(command, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-4000:]
    assert f"resuming the recipe in {folder}" in done.stdout
    assert "recipe stage first" not in done.stdout and "recipe stage audit" not in done.stdout
    assert f"ckpt_path={checkpoint}" in done.stdout  # the second training resumes from its own checkpoint
    assert (folder / "first" / "summary.json").stat().st_mtime_ns == first_summary  # not trained again
    resumed = (folder / "second" / "train.log").read_text()
    assert f"Restoring states from the checkpoint path at {checkpoint}" in resumed, resumed[-2000:]

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["first"]["steps"] == summary["second"]["steps"] == STEPS
    assert summary["second"]["teacher"] == "frozen" and summary["second"]["subset"] == "listed"
    assert summary["first"]["subset"] == "memory" and 0 <= summary["noise_estimate"] <= 1
    assert summary["zeroshot_top1"] == summary["second"]["zeroshot_top1"]
    assert (folder / "audit" / "memory.csv").is_file() and (folder / "audit" / "suspects.html").is_file()
    assert json.loads((folder / STATE_FILE).read_text())["finished"]
    # both runs in one W&B group, named after the recipe's folder
    groups = {OmegaConf.load(folder / run / ".hydra" / "config.yaml").logger.wandb.group for run in ("first", "second")}
    assert groups == {folder.name}


@pytest.mark.slow
def test_a_recipe_whose_first_checkpoint_is_gone_says_so_in_one_line(fashion_mnist_dir, tmp_path):
    command = recipe_command(fashion_mnist_dir, tmp_path)
    folder = tmp_path / "logs" / "audit_retrain" / "runs" / "earlier"
    (folder / "first").mkdir(parents=True)
    overrides = [arg for arg in command[2:] if not arg.startswith(("recipe", "ckpt_path"))]
    state = {"recipe": "audit_retrain", "overrides": overrides, "finished": False, "stages": {"first": {}}}
    (folder / STATE_FILE).write_text(json.dumps(state))
    done = run_in_session(command, timeout=300, env=checkout_env(WANDB_MODE="offline"), merge_output=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith(
        f"error: the first training left no usable checkpoint ({folder / 'first' / 'checkpoints' / 'last.ckpt'} is "
        "missing or cut off)"
    )


def test_a_restart_finds_the_unfinished_folder_of_the_same_command(tmp_path):
    def state(name: str, overrides: list[str], finished: bool) -> Path:
        folder = tmp_path / "audit_retrain" / "runs" / name
        folder.mkdir(parents=True)
        (folder / STATE_FILE).write_text(json.dumps({"overrides": overrides, "finished": finished, "stages": {}}))
        return folder

    fresh = tmp_path / "audit_retrain" / "runs" / "now"
    state("finished", ["seed=1"], True)
    other = state("other", ["seed=2"], False)
    assert resumable_folder(str(tmp_path), "audit_retrain", ["seed=1"], fresh) == fresh  # finished: a new run
    assert resumable_folder(str(tmp_path), "audit_retrain", ["seed=2"], fresh) == other
    assert resumable_folder(str(tmp_path), "audit_retrain", ["seed=3"], fresh) == fresh
