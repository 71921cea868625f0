"""Tiny end-to-end trainings from composed configs, as a user runs them."""

import json
from pathlib import Path

import pandas as pd
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from psdclip.training import train

ROOT = Path(__file__).resolve().parents[1]


def logged(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "csv" / "metrics.csv")


@pytest.mark.slow
def test_default_psd_training_logs_every_scalar_and_writes_a_summary(train_cfg, tmp_path):
    # margin 0: ten steps teach too little for a pair to be outscored by the default margin, and D would stay empty
    metrics = train(train_cfg("loss.subset.margin=0"))
    assert 0.0 <= metrics["eval/fashion_mnist/zeroshot_top1"] <= 1.0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "psd" and summary["alpha_max"] == 0.5 and summary["noise"] == 0.3
    assert summary["steps"] == 10 and summary["zeroshot_top1"] == metrics["eval/fashion_mnist/zeroshot_top1"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    log = logged(run)
    for key in [
        "train/loss",
        "train/loss_hard",
        "train/loss_soft",
        "train/alpha",
        "train/distill_count",
        "train/soft_target_entropy",
        "train/soft_target_diagonal",
        "train/logit_scale",
        "lr-AdamW/pg1",
        "train/device/samples_per_sec",
        "eval/fashion_mnist/zeroshot_top1",
        "eval/fashion_mnist/zeroshot_top5",
    ]:
        assert log[key].notna().any(), key
    alpha = log["train/alpha"].dropna().tolist()
    assert alpha[0] == 0.0 and alpha[-1] == pytest.approx(0.5) and alpha == sorted(alpha)
    counts = log["train/distill_count"].dropna().tolist()
    # outscored: at most floor(alpha · N) pairs, only those some candidate outscores
    assert all(count <= int(a * 32) for count, a in zip(counts, alpha, strict=True)) and max(counts) > 0


@pytest.mark.slow
@pytest.mark.parametrize("overrides,method", [(["loss=clip"], "clip"), (["teacher=ema"], "psd")])
def test_clip_and_ema_teacher_variants_train(train_cfg, tmp_path, overrides, method):
    metrics = train(train_cfg("trainer.max_steps=3", *overrides))
    assert "eval/fashion_mnist/zeroshot_top1" in metrics
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["method"] == method


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["loss.alpha_max=1.0"], "alpha_max must be in \\[0, 1\\)"),
        (["data.noise=-0.2"], "data.noise must be a fraction"),
    ],
)
def test_refused_configs_fail_with_clear_messages(train_cfg, overrides, message):
    """Each object refuses its own bad settings when the config instantiates it."""
    cfg = train_cfg(*overrides)
    group = "loss" if overrides[0].startswith("loss") else "data"
    with pytest.raises(InstantiationException, match=message):
        instantiate(cfg[group])


def test_unknown_model_name_fails_with_clear_message(train_cfg):
    with pytest.raises(InstantiationException, match="unknown model 'ViT-Nope'"):
        instantiate(train_cfg("model.name=ViT-Nope").model)


def test_a_random_subset_without_a_teacher_over_the_batch_is_refused_before_training(train_cfg):
    with pytest.raises(ValueError, match="no learning signal"):
        train(train_cfg("loss=psd_random", "teacher=self", "loss.scope=batch"))
