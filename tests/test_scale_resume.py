"""Resuming with ckpt_path=last follows the uninterrupted run; checkpoints are atomic; open_clip export round-trips."""

import csv
from pathlib import Path

import lightning as L
import numpy as np
import open_clip
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.fabric.plugins.io import torch_io
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import open_dict

from psdclip.run.checkpoint_files import AtomicCheckpointIO, resolve_ckpt_path
from psdclip.run.cli import check_settings
from psdclip.tools.export import export
from psdclip.training import train
from tests.conftest import make_fashion_mnist
from tests.helpers.trainers import quiet_trainer

CONF = str(Path(__file__).resolve().parents[1] / "conf")
STEPS, CRASH_AFTER, EVERY = 10, 8, 7  # 6 batches per epoch: the resume at step 7 is mid-epoch 1


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> Path:
    return make_fashion_mnist(tmp_path_factory.mktemp("fashion"), train=192, test=40)


class CrashAfter(L.Callback):
    """Stands in for a killed job: dies after `step` optimiser steps."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise SystemExit("killed")


def run(tmp: Path, fashion: Path, name: str, *overrides: str, crash: int | None = None):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.log_dir={tmp}/logs",
                f"paths.output_dir={tmp}/logs/train/runs/{name}",
                f"paths.cache_dir={tmp}/cache",
                f"paths.fashion_mnist_dir={fashion}",
                "~callbacks.evaluation",
                f"trainer.max_steps={STEPS}",
                "trainer.log_every_n_steps=1",
                "trainer.enable_progress_bar=false",
                "debug=tiny",
                "data.shuffle_buffer=64",
                "optim.scheduler.warmup_steps=3",
                f"callbacks.model_checkpoint.every_n_train_steps={EVERY}",
                "teacher=ema",
                "teacher.decay=0.9",
                "loss.ramp_start=0",  # alpha ramps over the whole run, across the resume point
                "loss.ramp_end=null",
                # the whole image every time (open_clip ignores ratio without use_timm)
                "model.augmentation.scale=[1.0,1.0]",
                *overrides,
            ],
        )
    check_settings(cfg)  # as train.py does before it calls train
    if crash:
        with open_dict(cfg):
            cfg.callbacks.crash = {"_target_": f"{__name__}.CrashAfter", "step": crash}
    try:
        train(cfg)
    except SystemExit:
        assert crash
    return Path(cfg.paths.output_dir)


def curves(run_dir: Path) -> dict[int, tuple[float, float, float]]:
    """step → (alpha, learning rate, D's size) from the CSV log."""
    with open(run_dir / "csv" / "metrics.csv") as metrics:
        rows = list(csv.DictReader(metrics))
    alpha = {int(r["step"]): float(r["train/alpha"]) for r in rows if r.get("train/alpha")}
    lr = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")}
    count = {int(r["step"]): float(r["train/distill_count"]) for r in rows if r.get("train/distill_count")}
    return {step: (alpha[step], lr[step], count[step]) for step in alpha.keys() & lr.keys() & count.keys()}


# the pair memory rule, deciding from each pair's second sighting (the tiny run sees each pair a few times) on a
# margin a tiny model's teacher reaches: the resumed run must restore the memory to choose the same D
MEMORY = ["loss/subset=memory", "loss.subset.min_sightings=2", "loss.subset.quantile=null", "loss.subset.margin=0.05"]


@pytest.mark.slow
@pytest.mark.parametrize("rule", [[], MEMORY], ids=["outscored", "memory"])
def test_resume_after_kill_follows_uninterrupted_run(tmp_path, fashion_dir, rule):
    straight = run(tmp_path, fashion_dir, "straight", *rule)
    killed = run(tmp_path, fashion_dir, "killed", *rule, crash=CRASH_AFTER)
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == EVERY
    resumed = run(tmp_path, fashion_dir, "resumed", *rule, "ckpt_path=last")

    expected, got = curves(straight), curves(resumed)
    later = sorted(step for step in expected if step >= EVERY)
    assert len(later) >= STEPS - EVERY - 1 and set(later) <= set(got), (sorted(expected), sorted(got))
    for step in later:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), f"step {step}"
    assert len({alpha for alpha, _, _ in expected.values()}) > 3  # alpha ramps, so the check has teeth
    assert not rule or max(count for *_, count in expected.values()) > 0  # the memory's D is not empty

    final = {
        name: torch.load(path / "checkpoints" / "last.ckpt", weights_only=True)
        for name, path in (("straight", straight), ("resumed", resumed))
    }
    assert final["straight"]["global_step"] == final["resumed"]["global_step"] == STEPS
    for key, value in final["straight"]["state_dict"].items():  # student, EMA teacher and the pair memory
        torch.testing.assert_close(final["resumed"]["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    saved_rng = [final[name]["rng_states"]["ranks"][0]["torch"] for name in ("resumed", "straight")]
    assert saved_rng[0].shape == saved_rng[1].shape


def test_ckpt_path_last_picks_newest_run(tmp_path):
    older, newer = (tmp_path / "train" / "runs" / name / "checkpoints" / "last.ckpt" for name in ("a", "b"))
    for index, path in enumerate((older, newer)):
        path.parent.mkdir(parents=True)
        torch.save({"global_step": index}, path)  # a complete checkpoint: ckpt_path=last skips broken ones
        import os

        os.utime(path, (1000 + index, 1000 + index))
    assert resolve_ckpt_path("last", str(tmp_path), "train") == str(newer)
    assert resolve_ckpt_path(None, str(tmp_path), "train") is None
    with pytest.raises(FileNotFoundError, match="no last.ckpt"):
        resolve_ckpt_path("last", str(tmp_path), "other_task")
    with pytest.raises(FileNotFoundError, match="not a file"):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), str(tmp_path), "train")


@pytest.mark.parametrize("io_class, survives", [(AtomicCheckpointIO, True), (TorchCheckpointIO, False)])
def test_partly_written_checkpoint_never_replaces_last(tmp_path, monkeypatch, io_class, survives):
    last = tmp_path / "last.ckpt"
    io = io_class()
    io.save_checkpoint({"step": 1, "weights": torch.arange(1000.0)}, last)
    good = last.read_bytes()

    def crash_mid_write(checkpoint, path):  # half the bytes reach the disk, then the job dies
        data = good[: len(good) // 2]
        with open(path, "wb") as f:
            f.write(data)
        raise OSError("disk full")

    if isinstance(io, AtomicCheckpointIO):
        monkeypatch.setattr(io, "write", crash_mid_write)  # its own writer, into the temporary file beside last.ckpt
    else:
        monkeypatch.setattr(torch_io, "_atomic_save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, last)
    assert (last.read_bytes() == good) is survives  # the plain writer shows the test can fail
    if survives:
        assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left behind
        assert io.load_checkpoint(last)["step"] == 1


@pytest.mark.parametrize("weights", ["student", "ema"])
def test_export_loads_in_open_clip_with_identical_embeddings(tmp_path, weights):
    from tests.helpers.one_step import Batches, global_batch, make_module

    module = make_module({"alpha_max": 0.5, "teacher": "ema", "ema_decay": 0.9}, local_loss=False)
    # 2 steps: the teacher's first update copies the student, the second makes the EMA differ from it
    trainer = quiet_trainer(
        max_steps=2,
    )
    trainer.fit(module, train_dataloaders=Batches(global_batch(16)))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    out = export(tmp_path / "run.ckpt", tmp_path / "export", weights=weights)

    source = module.model if weights == "student" else module.teacher.model
    source.eval()
    images, texts = global_batch(16)
    from PIL import Image

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))

    by_dir, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    open_clip.add_model_config(out / "psdclip-vit-tiny.json")
    by_name, _, _ = open_clip.create_model_and_transforms(
        "psdclip-vit-tiny", pretrained=str(out / "open_clip_model.safetensors")
    )
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    torch.testing.assert_close(tokenizer(["a shirt"]), module.tokenizer(["a shirt"]))
    torch.testing.assert_close(preprocess(picture), module.eval_transform(picture))
    with torch.no_grad():
        for loaded in (by_dir, by_name):
            loaded.eval()
            torch.testing.assert_close(loaded.encode_image(images), source.encode_image(images), rtol=0, atol=0)
            torch.testing.assert_close(loaded.encode_text(texts), source.encode_text(texts), rtol=0, atol=0)
            assert loaded.logit_scale.item() == source.logit_scale.item()
    if weights == "ema":  # the teacher really is a different model
        assert not torch.allclose(by_dir.encode_image(images), module.model.encode_image(images))
