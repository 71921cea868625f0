"""Shared fixtures: tiny Fashion-MNIST-format idx files made here, and composed training configs."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from psdclip.run.cli import check_settings

# under `pytest -n 2` each worker, and every training it starts, keeps to one core instead of both contending for two
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(magic + array.astype(np.uint8).tobytes())


def class_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """28×28 images whose class is visible: class k lights up a band of rows, plus noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (len(labels), 28, 28))
    for index, label in enumerate(labels):
        images[index, 2 + 2 * label : 5 + 2 * label] = 255
    return images


def make_fashion_mnist(folder: Path, train: int = 349, test: int = 100) -> Path:
    """Idx files of `train` and `test` images; the embedded train split is 320 of the 349 (the rest is `val`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count, seed in (("train", train, 0), ("t10k", test, 1)):
        labels = np.arange(count) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", class_images(labels, seed))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="session", autouse=True)
def subprocess_temp_dir(tmp_path_factory):
    """Trainings a test starts keep their temporary files in the test run's folder: one killed on purpose cannot
    delete them (wandb, imported through timm, makes two folders in every process), and the system's would fill up."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        yield


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory) -> Path:
    return make_fashion_mnist(tmp_path_factory.mktemp("fashion_mnist"))


def compose_config(overrides: list[str], name: str = "train") -> DictConfig:
    """``conf/<name>.yaml`` composed with ``overrides`` as its entry point would (the hydra node included)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, return_hydra_config=True, overrides=overrides)


def tiny_paths(fashion_mnist_dir: Path, tmp_path: Path) -> list[str]:
    """The test's Fashion-MNIST files, and every file a command writes under ``tmp_path``."""
    return [
        f"paths.fashion_mnist_dir={fashion_mnist_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]


def tiny_run_overrides(fashion_mnist_dir: Path, tmp_path: Path) -> list[str]:
    """A tiny training (``debug=tiny``) on the test's Fashion-MNIST files, writing only under ``tmp_path`` (any
    ``data`` config)."""
    return [*tiny_paths(fashion_mnist_dir, tmp_path), "debug=tiny"]


@pytest.fixture
def train_cfg(tmp_path, fashion_mnist_dir):
    """A factory for tiny training configs writing under tmp_path, checked as train.py checks them before it calls
    ``psdclip.training.train``; extra overrides win."""

    def make(*overrides: str) -> DictConfig:
        cfg = compose_config(
            [
                *tiny_run_overrides(fashion_mnist_dir, tmp_path),
                "data.shard_size=100",
                "trainer.max_steps=-1",  # the whole epoch
                "trainer.enable_progress_bar=false",
                "optim.scheduler.warmup_steps=2",
                *overrides,
            ]
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        check_settings(cfg)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # as in a real run, where @hydra.main hands over the config without it
        return cfg

    yield make
    GlobalHydra.instance().clear()
