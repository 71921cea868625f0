"""A run's console, log file, folder and disk use (issue 12, items 13-15).

`train.py` and `evaluate.py` run as subprocesses, each in its own session, killed with their children when a test
ends, passed or not.
"""

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from psdclip.callbacks.progress import RichProgress
from psdclip.data.embedded import FashionMNISTShards
from psdclip.eval.datasets import FashionMNISTEvalSet
from psdclip.eval.suite import EvalSuite
from psdclip.training import train
from tests.conftest import compose_config, tiny_run_overrides
from tests.helpers.processes import checkout_env, run_in_session

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], timeout: float = 1500, **env: str) -> subprocess.CompletedProcess:
    """``command`` in the repository with this checkout's psdclip, its output merged; killed on timeout or error."""
    return run_in_session(command, timeout, checkout_env(**env))


def tiny_train_overrides(fashion_mnist_dir: Path, tmp: Path) -> list[str]:
    return [*tiny_run_overrides(fashion_mnist_dir, tmp), f"hydra.run.dir={tmp / 'run'}", "data.shard_size=100"]


@pytest.fixture(scope="module")
def tiny_run(fashion_mnist_dir, tmp_path_factory) -> tuple[Path, str]:
    """A 2-step train.py run with the rich bar (figures every step) and a checkpoint every step: its folder and output."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    done = run(
        [
            sys.executable,
            "train.py",
            *tiny_train_overrides(fashion_mnist_dir, tmp),
            "trainer.max_steps=2",
            "callbacks.progress.style=rich",
            "callbacks.progress.every_n_steps=1",
            "callbacks.model_checkpoint.every_n_train_steps=1",
        ]
    )
    assert done.returncode == 0, done.stdout[-3000:]
    return tmp / "run", done.stdout


# item 11: progress where there was silence


def test_run_folder_is_printed_before_training_starts(tiny_run):
    run_dir, output = tiny_run
    assert f"run folder: {run_dir}" in output
    # before the first thing a run waits for (writing the shards), not only in the summary at the end
    assert output.index("run folder:") < output.index("writing fashion_mnist train shards") < output.index("summary:")


def test_writing_the_embedded_shards_reports_progress(fashion_mnist_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    FashionMNISTShards("train", str(fashion_mnist_dir), str(tmp_path), shard_size=100).ensure()
    assert "fashion_mnist train shards: 320 images in" in caplog.text


def test_evaluation_reports_each_dataset_s_features_and_the_probe_s_search(fashion_mnist_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    dataset = FashionMNISTEvalSet(str(fashion_mnist_dir), str(tmp_path), train_samples=200)
    suite = EvalSuite(
        {"fashion_mnist": dataset},
        ["linear_probe"],
        batch_size=50,
        linear_probe={"log10_range": (-2, 2), "refinements": 1},
    )
    suite.run(PixelEncoder())
    assert "fashion_mnist test features: 100 images in" in caplog.text
    assert "fashion_mnist train features: 200 images in" in caplog.text
    assert (
        caplog.text.count("linear probe: C=") >= 3 and "held-out top-1" in caplog.text and "chosen from" in caplog.text
    )


class PixelEncoder:
    """Images as their (normalised) pixels: enough to run the feature extraction and the linear probe."""

    def eval_transform(self, image):
        return torch.from_numpy(np.asarray(image.convert("L").resize((8, 8)), dtype=np.float32)).flatten()

    def encode_image(self, images):
        return images


# item 13: console noise


def test_console_shows_no_library_start_up_noise(tiny_run):
    _, output = tiny_run
    for noise in (
        "Parsing model identifier",  # open_clip's INFO lines
        "No pretrained weights loaded",
        "💡 Tip",  # Lightning's advertisement
        "LeafSpec",  # Lightning's use of a deprecated torch API
        "`__len__` defined",
        "Total FLOPs",
    ):
        assert noise not in output, f"{noise!r} in:\n{output}"
    assert output.count("Seed set to 0") == 1, output  # Lightning's records once, not also through its own handler
    assert "GPU available" in output and "trainable parameters" in output  # what a user needs stays


def test_shard_loader_workers_follow_the_available_cpus(tmp_path):
    cfg = compose_config(["data=shards", f"data.train_shards={tmp_path}"])
    assert cfg.data.num_workers == min(8, len(os.sched_getaffinity(0)))


def test_export_does_not_warn_about_random_weights(tiny_run, tmp_path):
    folder, _ = tiny_run
    done = run(
        [
            sys.executable,
            "-m",
            "psdclip.tools.export",
            f"ckpt={folder / 'checkpoints' / 'last.ckpt'}",
            f"out={tmp_path / 'out'}",
        ]
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "No pretrained weights loaded" not in done.stdout and "Parsing model identifier" not in done.stdout


# item 14: where things are


def test_train_log_holds_progress_evaluation_and_summary(tiny_run):
    folder, _ = tiny_run
    text = (folder / "train.log").read_text()
    assert "step 2/2" in text and "loss" in text, text  # the rich bar's figures, which never reach the log otherwise
    assert "evaluation at step 2" in text and "zeroshot_top1" in text, text
    assert f"summary: {folder / 'summary.json'}" in text, text


def test_summary_and_evaluation_results_sit_at_the_run_root(tiny_run):
    folder, _ = tiny_run
    assert json.loads((folder / "summary.json").read_text())["steps"] == 2
    assert (folder / "eval_results.json").is_file()
    assert not (folder / "checkpoints" / "summary.json").exists()


def test_config_error_reaches_train_log(fashion_mnist_dir, tmp_path):
    done = run(
        [sys.executable, "train.py", *tiny_train_overrides(fashion_mnist_dir, tmp_path), "optim.optimizer.lr=-1"],
        timeout=600,
    )
    assert done.returncode == 1 and "error: optim.optimizer.lr=-1 cannot work" in done.stdout, done.stdout[-3000:]
    assert "error: optim.optimizer.lr=-1 cannot work" in (tmp_path / "run" / "train.log").read_text()


def test_evaluate_writes_results_beside_the_checkpoint(tiny_run, fashion_mnist_dir, tmp_path):
    folder, _ = tiny_run
    checkpoint = folder / "checkpoints" / "last.ckpt"
    done = run(
        [
            sys.executable,
            "evaluate.py",
            f"ckpt={checkpoint}",
            "evaluation=default",
            f"paths.fashion_mnist_dir={fashion_mnist_dir}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ]
    )
    assert done.returncode == 0, done.stdout[-3000:]
    results = folder / "checkpoints" / "last.eval.json"
    assert json.loads(results.read_text())["ckpt"] == str(checkpoint)
    assert f"results: {results}" in (tmp_path / "eval" / "evaluate.log").read_text()


class RecordingBar(RichProgress):
    """Records the training bar's description once each epoch has started."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.descriptions = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        task = next(task for task in self.progress.tasks if task.id == self.train_progress_bar_id)
        self.descriptions.append(task.description.strip())


def test_rich_bar_counts_epochs_from_one(tmp_path):
    bar = RecordingBar(console_kwargs={"file": io.StringIO(), "force_terminal": True})
    trainer = L.Trainer(
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=0,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    assert bar.descriptions == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]


def test_max_steps_overrides_max_epochs(train_cfg):
    # 320 training pairs in batches of 32: one epoch is 10 steps
    cfg = train_cfg("trainer.max_steps=13", "trainer.max_epochs=1", "~callbacks.evaluation", "~callbacks.media")
    train(cfg)
    assert json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())["steps"] == 13


# item 15: disk


def test_one_rolling_checkpoint_by_default(tiny_run):
    folder, _ = tiny_run
    assert sorted(path.name for path in (folder / "checkpoints").glob("*.ckpt")) == ["last.ckpt"]


def test_make_clean_cache_deletes_the_cached_shards(tmp_path):
    cache = tmp_path / "cache"
    shard_set = cache / "fashion_mnist" / "train-noise0.3-flip-n320-0123456789"
    shard_set.mkdir(parents=True)
    (shard_set / "train-000000.tar").write_bytes(b"\0" * 1024)
    mine = cache / "not_psdclip.txt"
    mine.write_text("kept")
    listed = run([sys.executable, "-m", "psdclip.tools.cache"], timeout=600, PSDCLIP_CACHE=str(cache))
    assert listed.returncode == 0 and str(shard_set) in listed.stdout, listed.stdout
    done = run(["make", "-s", "clean-cache", f"PYTHON={sys.executable}"], timeout=600, PSDCLIP_CACHE=str(cache))
    assert done.returncode == 0, done.stdout
    assert not shard_set.exists() and mine.read_text() == "kept"
