"""Experiment tooling: W&B offline runs read back from their files, progress reporters, sweeps + psdclip.tools.report,
the noisy-caption study, and the noisy-pair audit."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import OmegaConf

from psdclip.callbacks.progress import LogProgress, progress_bar
from psdclip.models import read_checkpoint
from psdclip.run.loggers import git_state
from psdclip.subsets import DoubtSubset, OutscoredSubset
from psdclip.tools.audit import batch_query, quality
from psdclip.tools.report import Job, parse_overrides, swept_keys
from psdclip.tools.study import aggregate, commands, run_study
from psdclip.training import train
from tests.conftest import compose_config, tiny_paths, tiny_run_overrides
from tests.helpers.losses import make_loss
from tests.helpers.processes import run_in_session

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.shard_size=100", "trainer.enable_progress_bar=false", "callbacks.media.examples=40"]


def wandb_records(path: Path):
    """Records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB-log chunks (crc32, length, type) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, parts = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        body, pos = data[pos + header : pos + header + length], pos + header + length
        if kind == 0:
            continue
        parts = body if kind in (1, 2) else parts + body  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def item_keys(items) -> set[str]:
    return {item.key or "/".join(item.nested_key) for item in items}


@pytest.mark.slow
def test_offline_wandb_run_records_scalars_media_config_and_summary(train_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = train(
        train_cfg(
            "logger=wandb",
            "tags=[unit]",
            "trainer.max_steps=3",
            "callbacks.media.every_n_steps=2",
            "callbacks.media.examples=40",
        )
    )
    import wandb

    # the run is finished, but W&B's service process may still be writing its last rows; a user's process flushes them
    # at exit, this test process reads the file before it exits
    wandb.teardown()
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history, summary, config, runs = set(), {}, set(), []
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= item_keys(record.history.item)
            # a run's summary is each key's last logged value unless set explicitly (as `wandb sync` rebuilds it);
            # how much of it W&B also writes as summary records depends on when its writer flushes
            summary.update({item.key: item.value_json for item in record.history.item if item.key})
        elif kind == "summary":
            summary.update({item.key: item.value_json for item in record.summary.update if item.key})
        elif kind == "config":
            config |= item_keys(record.config.update)
        elif kind == "run":
            runs.append(record.run)
    scalars = {
        f"train/{name}"
        for name in (
            "loss",
            "loss_hard",
            "loss_soft",
            "alpha",
            "distill_count",
            "soft_target_entropy",
            "soft_target_diagonal",
            "logit_scale",
        )
    }
    assert scalars | {"lr-AdamW/pg1", "train/device/samples_per_sec", "eval/fashion_mnist/zeroshot_top1"} <= history
    media = {
        "media/similarity/_type",
        "media/soft_targets/_type",
        "eval/fashion_mnist/confusion_matrix_table/_type",
        "eval/fashion_mnist/retrieval_text_to_image/_type",
        "eval/fashion_mnist/retrieval_image_to_text/_type",
    }
    assert media <= history
    assert {"model", "loss", "data", "optim", "trainer", "git"} <= config
    assert float(summary["eval/fashion_mnist/zeroshot_top1"]) == pytest.approx(
        metrics["eval/fashion_mnist/zeroshot_top1"]
    )
    assert int(summary["final/global_step"]) == 3
    assert runs[0].project == "psdclip" and list(runs[0].tags) == ["unit"] and runs[0].job_type == "train"
    # the same media as files, for CSV/TensorBoard users
    saved = {p.name for p in (tmp_path / "run" / "media").iterdir()}
    assert {
        "media_similarity_step0000001.png",
        "media_soft_targets_step0000003.png",
        "eval_fashion_mnist_confusion_matrix_step0000003.png",
        "eval_fashion_mnist_retrieval_text_to_image.md",
    } <= saved
    # 4 caption queries × top 5 images, from the evaluation's own test images; hit = the caption's own image
    table = (tmp_path / "run" / "media" / "eval_fashion_mnist_retrieval_text_to_image.md").read_text().splitlines()
    assert table[0] == "| query | rank | class | hit |" and len(table) == 2 + 4 * 5


def test_media_pictures_undo_the_model_transform_s_normalisation():
    from PIL import Image
    from torchvision import transforms

    from psdclip.callbacks.media import picture

    pixels = torch.randint(0, 256, (6, 5, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.numpy())
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5, 0.4, 0.3], [0.2, 0.3, 0.25])])
    shown = torch.from_numpy(np.array(picture(transform(image), transform))).int()
    assert (shown - pixels.int()).abs().max() <= 1


def test_git_state_names_this_checkout_commit():
    state = git_state(ROOT)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert state["commit"] == head and isinstance(state["dirty"], bool)
    assert git_state("/") == {}


def test_progress_reporter_follows_the_terminal(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert isinstance(progress_bar(style="auto"), RichProgressBar)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    reporter = progress_bar(style="auto", every_n_steps=7)
    assert isinstance(reporter, LogProgress) and reporter.every_n_steps == 7
    assert progress_bar(enabled=False) is None
    with pytest.raises(ValueError, match="unknown progress style 'fancy'"):
        progress_bar(style="fancy")


@pytest.mark.slow
def test_log_progress_reports_loss_alpha_and_samples_per_second(train_cfg, caplog):
    caplog.set_level("INFO", logger="psdclip.callbacks.progress")
    train(
        train_cfg(
            "trainer.enable_progress_bar=true",
            "callbacks.progress.style=log",
            "callbacks.progress.every_n_steps=2",
            "trainer.max_steps=4",
            "callbacks.media.examples=0",
        )
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "psdclip.callbacks.progress"]
    assert any("step 4/4" in line for line in lines), lines
    assert all("loss" in line and "alpha" in line for line in lines)
    assert any("samples/s" in line for line in lines)


def test_overrides_parse_to_typed_values_and_swept_keys_are_those_that_vary():
    overrides = parse_overrides(["loss.alpha_max=0.25", "seed=1", "loss=clip", "+extra=x", "~callbacks.media"])
    assert overrides == {"loss.alpha_max": 0.25, "seed": 1, "loss": "clip", "extra": "x"}
    jobs = [Job(Path(str(i)), {"a": i, "b": 1, "c": "x" if i else "y"}, {}) for i in range(3)]
    assert swept_keys(jobs) == ["a", "c"]


@pytest.mark.slow
def test_an_alpha_grid_sweep_chooses_on_val_and_report_shows_val_and_test(fashion_mnist_dir, tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "train.py", "-m", "hparams_search=alpha_grid", f"hydra.sweep.dir={sweep}"]
    result = run_in_session([*command, *tiny_run_overrides(fashion_mnist_dir, tmp_path), *TINY], 600)
    assert result.returncode == 0, result.stdout[-3000:]
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(4)]
    assert [(s["method"], s["alpha_max"]) for s in summaries] == [
        ("clip", 0),
        ("psd", 0.25),
        ("psd", 0.5),
        ("psd", 0.75),
    ]
    val, test = "eval/fashion_mnist_val/zeroshot_top1", "eval/fashion_mnist/zeroshot_top1"
    assert all(s["optimized_metric"] == val and s["optimized"] == s["metrics"][val] for s in summaries)
    assert all(s["zeroshot_top1"] == s["metrics"][test] for s in summaries)  # the headline is the test split's
    assert json.loads((sweep / "summary.json").read_text()) == summaries
    table = result.stdout[result.stdout.index("Multirun summary") :]
    assert "clip" in table and "psd" in table and "zeroshot_top1" in table and "optimized" in table

    result = run_in_session([sys.executable, "-m", "psdclip.tools.report", str(sweep)], 300)
    assert result.returncode == 0, result.stdout[-3000:]
    table = pd.read_csv(sweep / "report.csv")
    assert table["loss.alpha_max"].tolist() == [0, 0.25, 0.5, 0.75]
    for metric in (val, test):  # the held-out split that chose and the test split, side by side
        assert table[metric].tolist() == pytest.approx([s["metrics"][metric] for s in summaries])
    assert list(table.columns)[2] == val and "eval/fashion_mnist/zeroshot_top5" in table  # every eval/* metric
    best = max(range(4), key=lambda i: (summaries[i]["optimized"], -i))
    verdict = (
        f"Chosen on {val} (held-out data): job {best} (loss.alpha_max={summaries[best]['alpha_max']}) with "
        f"{summaries[best]['optimized']:.4f}; its test zero-shot top-1 {summaries[best]['zeroshot_top1']:.4f}."
    )
    markdown = (sweep / "report.md").read_text()
    assert verdict in markdown and verdict in result.stdout
    assert "| job | loss.alpha_max |" in markdown and markdown.count("\n| ") == 5
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_optuna_maximises_the_val_metric(fashion_mnist_dir, tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2"]
    command += ["hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={sweep}", "trainer.max_steps=2"]
    result = run_in_session([*command, *tiny_run_overrides(fashion_mnist_dir, tmp_path), *TINY], 600)
    assert result.returncode == 0, result.stdout[-3000:]
    values = [json.loads((sweep / str(i) / "summary.json").read_text())["optimized"] for i in range(2)]
    chosen = OmegaConf.load(sweep / "optimization_results.yaml")
    assert chosen.best_value == pytest.approx(max(values))


def test_report_refuses_folders_without_jobs_and_unknown_metrics(tmp_path):
    from psdclip.tools.report import report

    with pytest.raises(FileNotFoundError, match="no Hydra jobs"):
        report(tmp_path)
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    with pytest.raises(FileNotFoundError, match="none has summary.json"):
        report(tmp_path)
    (job / "checkpoints").mkdir()
    (job / "checkpoints" / "summary.json").write_text(json.dumps({"metrics": {"eval/x/top1": 0.5}}))
    with pytest.raises(ValueError, match="'eval/nope' was not measured"):
        report(tmp_path, metric="eval/nope")


def study_config(*overrides: str):
    return compose_config(list(overrides), name="study")


def test_study_settings_are_checked_before_any_training(tmp_path):
    for bad, message in (
        ("seeds=zero", "seeds must be a whole number >= 1, got 'zero'"),
        ("first_seed=-1", "first_seed must be a whole number >= 0"),
        ("split=train", "split must be test or val"),
        ("dataset=cc3m", "dataset must be one of embedded, embedded_mosaic"),
        ("noise=0.4", r"noise must be a non-empty list, e.g. noise=\[0,0.4\]"),
        ("kinds=[]", "kinds must be a non-empty list"),
    ):
        with pytest.raises(ValueError, match=message):
            commands(study_config(bad), tmp_path)


def test_study_runs_clean_data_once_and_noisy_data_per_kind(tmp_path):
    cfg = study_config("noise=[0,0.4]", "seeds=3", "first_seed=100", "split=val", "+train.trainer.max_epochs=2")
    clean, noisy = commands(cfg, tmp_path)
    for command in (clean, noisy):
        assert "seed=100,101,102" in command and "evaluation.datasets.fashion_mnist.split=val" in command
        assert "loss=clip,psd" in command and "trainer.max_epochs=2" in command
    assert (
        "data.noise=0" in clean and "data.noise_kind=flip" in clean and f"hydra.sweep.dir={tmp_path / 'clean'}" in clean
    )
    assert "data.noise=0.4" in noisy and "data.noise_kind=flip,swap" in noisy


def test_study_hands_its_train_settings_to_train_py_as_overrides_it_reads_back(tmp_path):
    """+train.KEY=VALUE reaches train.py as KEY=VALUE with the same value, whatever its type."""
    cfg = study_config(
        "noise=[0]",
        "seeds=1",
        "methods=[psd]",
        "+train.loss.alpha_max=0.3",
        "+train.evaluation.tasks=[zeroshot,retrieval]",
        "+train.paths.log_dir='/tmp/a dir'",
        "+train.data.train_size=null",
        "+train.task_name='0.5'",
        "+train.model=vit_b32",
    )
    (clean,) = commands(cfg, tmp_path)
    overrides = clean[clean.index("-m") + 1 :]
    composed = compose_config(overrides)
    assert composed.loss.alpha_max == 0.3 and list(composed.evaluation.tasks) == ["zeroshot", "retrieval"]
    assert composed.paths.log_dir == "/tmp/a dir" and composed.data.train_size is None
    assert composed.task_name == "0.5" and composed.model.name == "ViT-B-32"


def test_study_on_mosaics_runs_their_recipe_with_retrieval_first(tmp_path):
    cfg = study_config("dataset=embedded_mosaic", "noise=[0.4]", "seeds=1")
    (noisy,) = commands(cfg, tmp_path)
    assert "experiment=noisy_captions_mosaic" in noisy and "evaluation.datasets.fashion_mosaic.split=test" in noisy
    assert "data.noise_kind=partial,swap" in noisy and not any(item.startswith("data=") for item in noisy)


def test_study_aggregate_gives_mean_std_and_difference():
    runs = pd.DataFrame(
        {
            "method": ["clip", "clip", "psd", "psd"],
            "kind": ["flip"] * 4,
            "noise": [0.4] * 4,
            "seed": [0, 1, 0, 1],
            "m": [0.5, 0.7, 0.6, 0.8],
        }
    )
    row = aggregate(runs, ["m"]).iloc[0]
    assert (
        row["clip"] == "0.6000 ± 0.1414 (n=2)"
        and row["psd"] == "0.7000 ± 0.1414 (n=2)"
        and row["psd − clip"] == "+0.1000"
    )


@pytest.mark.slow
def test_quick_study_runs_end_to_end(fashion_mnist_dir, tmp_path):
    out = tmp_path / "study"
    command = [
        sys.executable,
        "-m",
        "psdclip.tools.study",
        "quick=true",
        "noise=[0,0.5]",
        "kinds=[flip]",
        "seeds=2",
        f"out={out}",
        *(f"+train.{item}" for item in tiny_paths(fashion_mnist_dir, tmp_path)),
        "+train.data.shard_size=100",
        # 3 steps teach the model too little to outscore anything by the default margin: D would stay empty
        "+train.loss.subset.margin=0",
    ]
    result = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = pd.read_csv(out / "study.csv")
    assert sorted(zip(runs["method"], runs["noise"], runs["seed"])) == sorted(
        (m, n, s) for m in ("clip", "psd") for n in (0.0, 0.5) for s in (0, 1)
    )
    table = (out / "study.md").read_text()
    assert "eval/fashion_mnist/zeroshot_top1" in table and "(n=2)" in table and "psd − clip" in table
    # the learning curve's best zero-shot (on val) is reported beside the final one, and D's precision for PSD
    assert runs["eval/fashion_mnist_val/zeroshot_top1_best"].notna().all() and set(runs["kind"]) == {"clean", "flip"}
    assert runs.loc[(runs["method"] == "psd") & (runs["noise"] > 0), "train/distill_precision_epoch"].notna().all()
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each run's headline is the end-of-training evaluation's zero-shot, not the val learning curve's
    summary = json.loads(next(out.glob("*/0/summary.json")).read_text())
    assert summary["zeroshot_top1"] == summary["metrics"]["eval/fashion_mnist/zeroshot_top1"]
    # summarise=true trains nothing and writes the same tables again from the runs under out=
    written = (out / "study.md").read_text()
    (out / "study.md").unlink()
    run_study(study_config("summarise=true", f"out={out}"))
    assert (out / "study.md").read_text() == written


@pytest.mark.parametrize("rule", [OutscoredSubset(margin=0.5, ramp=0.0), DoubtSubset()])
def test_audit_scores_pairs_with_the_doubt_of_the_rule(rule):
    """The audit's score is the rule's doubt of each pair in its batch, and its flags in a batch are the rule's D as
    the loss would choose it in training."""
    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(10, 8, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(image + 0.5 * torch.randn(10, 8, generator=generator), dim=-1)
    query = batch_query(image, text, scale=10.0, tau=2.0, fraction=0.4)
    score = rule.score(query)
    logits = 10.0 * image @ text.T / 2.0
    if isinstance(rule, DoubtSubset):  # 1 − the probability on the own partner
        by_hand = 1 - 0.5 * (logits.softmax(1).diagonal() + logits.T.softmax(1).diagonal())
    else:  # how far the best candidate outscores the own partner
        by_hand = 0.5 * (logits.max(1).values + logits.max(0).values) - logits.diagonal()
    torch.testing.assert_close(score, by_hand)
    loss = make_loss(rule, alpha_max=0.4, tau_teacher=2.0)
    trained = loss.from_logits(10.0 * image @ text.T, 10.0 * text @ image.T, torch.arange(10), 0, 1).subset.chosen
    assert torch.equal(trained, rule(query).chosen) and trained.sum() >= 1


def test_audit_quality_against_known_corruption():
    frame = pd.DataFrame(
        {
            "score": [0.9, 0.8, 0.6, 0.2, 0.1],
            "flagged": [True, True, True, False, False],
            "corrupted": [True, False, True, False, False],
        }
    )
    result = quality(frame)
    assert result["flagged"] == 3 and result["precision"] == pytest.approx(2 / 3) and result["recall"] == 1.0
    assert result["auroc"] == pytest.approx(5 / 6) and result["precision_at_corrupted_count"] == 0.5
    assert "auroc" not in quality(frame.drop(columns="corrupted"))


def test_the_audit_never_flags_more_pairs_than_the_runs_noise_estimate():
    from psdclip.tools.audit import at_most_the_estimate

    # most suspect first; 8 of the data's own pairs seen 6 times, one seen once, one threshold pair (never flagged)
    table = pd.DataFrame(
        {
            "remembered_gap": [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.5, 1.0],
            "sightings": [6, 6, 6, 6, 6, 6, 6, 6, 1, 6],
            "threshold_pair": [False, True, False, False, False, False, False, False, False, False],
            "flagged": [True, False, True, True, True, True, False, False, False, False],
        }
    )
    # an estimate of 0.25 of the 8 pairs seen 6 times (the top of its range 0.5): the two most suspect flagged pairs
    # stay, whatever the top says
    capped = at_most_the_estimate(table.copy(), {"noise_estimate": 0.25, "noise_estimate_high": 0.5}, min_sightings=6)
    assert capped["flagged"].tolist() == [True, False, True] + [False] * 7
    # 0.375 of 8 is 3 pairs: the three most suspect of the four flagged, the threshold pair skipped
    three = at_most_the_estimate(table.copy(), {"noise_estimate": 0.375, "noise_estimate_high": 0.5}, min_sightings=6)
    assert three["flagged"].tolist() == [True, False, True, True] + [False] * 6
    # an estimate above the flagged share changes nothing; so does none (no threshold pairs were seen)
    high = {"noise_estimate": 0.9, "noise_estimate_high": 1.0}
    assert at_most_the_estimate(table.copy(), high, min_sightings=6).equals(table)
    unknown = {"noise_estimate": float("nan"), "noise_estimate_high": float("nan")}
    assert at_most_the_estimate(table.copy(), unknown, min_sightings=6).equals(table)


@pytest.mark.slow
def test_audit_ranks_corrupted_pairs_above_clean_ones(train_cfg, fashion_mnist_dir, tmp_path):
    # a tiny model learns the synthetic classes (a bright band per class) from clean captions …
    train(
        train_cfg(
            "loss=clip",
            "data.noise=0",
            "trainer.max_epochs=100",
            "trainer.max_steps=60",
            "optim.optimizer.lr=3e-3",
            "optim.scheduler.warmup_steps=5",
            "callbacks.media.examples=0",
        )
    )
    # … then audits the same images with 30% of the captions naming a wrong class
    command = [
        sys.executable,
        "-m",
        "psdclip.tools.audit",
        f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
        "data.noise=0.3",
        "data.shard_size=100",
        *tiny_paths(fashion_mnist_dir, tmp_path),
        f"hydra.run.dir={tmp_path / 'audit'}",
    ]
    result = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert report["pairs"] == 320 and 60 <= report["corrupted"] <= 130
    assert report["auroc"] > 0.75, report
    scores = pd.read_csv(tmp_path / "audit" / "scores.csv")
    assert len(scores) == 320 and scores["score"].is_monotonic_decreasing
    assert list(scores.columns[:4]) == ["shard", "key", "caption", "score"]
    suspects = pd.read_csv(tmp_path / "audit" / "suspects.csv")
    assert len(suspects) == 100 and suspects["corrupted"].head(20).mean() > 0.8
    assert '<img src="data:image/png;base64,' in (tmp_path / "audit" / "suspects.html").read_text()


@pytest.mark.slow
def test_audit_writes_the_run_s_pair_memory_and_its_noise_estimate(train_cfg, fashion_mnist_dir, tmp_path):
    """A short run with the memory rule (3 epochs of 320 pairs, 30% wrong captions); the audit then lists every
    pair of the data with what the run remembered of it, and says what the run's last epoch logged."""
    train(
        train_cfg(
            "loss=psd_memory",
            "loss.subset.min_sightings=1",
            "loss.subset.margin=0.1",  # a floor a 3-epoch model's calibrated cut-off can go below
            "data.noise=0.3",
            "trainer.max_epochs=3",
            "callbacks.media=null",
            "callbacks.evaluation=null",
        )
    )
    cfg = compose_config(
        [
            f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
            "loss/subset@subset=memory",
            "subset.min_sightings=1",
            "data.noise=0.3",
            "data.shard_size=100",
            "batch_size=32",
            *tiny_paths(fashion_mnist_dir, tmp_path),
        ],
        name="audit",
    )
    from psdclip.tools.audit import audit

    report = audit(cfg, tmp_path / "audit")
    table = pd.read_csv(tmp_path / "audit" / "memory.csv")
    assert list(table.columns[:8]) == [
        "shard",
        "key",
        "pair_id",
        "caption",
        "remembered_gap",
        "sightings",
        "threshold_pair",
        "flagged",
    ]
    assert len(table) == 320 and table["remembered_gap"].dropna().is_monotonic_decreasing
    assert (table["sightings"] == 3).all() and table["threshold_pair"].any()
    # a threshold pair's gap is its planted caption's: the retraining, which reads its own caption, is not told of it
    assert not table.loc[table["threshold_pair"], "flagged"].any()
    logged = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")["train/noise_estimate"].dropna()
    assert report["memory"]["noise_estimate"] == pytest.approx(logged.iloc[-1], abs=1e-6)
    assert report["memory"]["unseen_pairs"] == 0
    own = ~table["threshold_pair"]
    # flagged: at most the run's estimated share of wrong captions
    assert 0 < (table["flagged"] & own).sum() <= round(report["memory"]["noise_estimate"] * own.sum())
    # a second training given the table distils exactly its flagged pairs (alpha high enough never to bind): D's
    # precision and recall over an epoch, against the shards' marks, are the flagged rows'; its teacher is the first
    # run's EMA teacher, unchanged
    retrain = train_cfg(
        "loss=psd_listed",
        f"loss.subset.keys={tmp_path / 'audit' / 'memory.csv'}",
        "teacher=frozen",
        f"teacher.checkpoint={tmp_path / 'first_run' / 'checkpoints' / 'last.ckpt'}",
        "loss.alpha_max=0.99",
        "data.noise=0.3",
        "trainer.max_epochs=1",
        "callbacks.media=null",
        "callbacks.evaluation=null",
    )
    assert retrain.data.threshold_pairs == 0
    (tmp_path / "run").rename(tmp_path / "first_run")  # the retraining's run folder is a new one
    train(retrain)
    epoch = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv").dropna(subset=["train/distill_recall_epoch"])
    flagged, corrupted = table["flagged"], table["corrupted"]
    assert epoch["train/distill_precision_epoch"].iloc[-1] == pytest.approx(corrupted[flagged].mean())
    assert epoch["train/distill_recall_epoch"].iloc[-1] == pytest.approx(flagged[corrupted].mean())
    first, second = (
        read_checkpoint(tmp_path / run / "checkpoints" / "last.ckpt", "ema")[1] for run in ("first_run", "run")
    )
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    assert [json.loads((tmp_path / run / "summary.json").read_text())["teacher"] for run in ("first_run", "run")] == [
        "ema",
        "frozen",
    ]


def test_audit_says_how_to_choose_its_rule_when_given_a_bare_name(tmp_path):
    """`subset=memory` replaces the rule's config with a string: the audit names the override that chooses one."""
    from psdclip.tools.audit import audit

    cfg = compose_config([f"ckpt={tmp_path / 'last.ckpt'}", "subset=memory"], name="audit")
    with pytest.raises(TypeError, match="loss/subset@subset=memory, not subset=memory"):
        audit(cfg, tmp_path / "audit")
    assert not (tmp_path / "audit").exists()


@pytest.mark.parametrize("rule", ["random", "listed"])
def test_audit_refuses_a_rule_without_a_doubt_score_before_reading_anything(rule, tmp_path):
    from psdclip.tools.audit import audit

    (tmp_path / "memory.csv").write_text("pair_id,flagged\n3,True\n")
    listed = [f"subset.keys={tmp_path / 'memory.csv'}"] if rule == "listed" else []
    cfg = compose_config([f"ckpt={tmp_path / 'last.ckpt'}", f"loss/subset@subset={rule}", *listed], name="audit")
    with pytest.raises(ValueError, match=f"subset {rule} has no doubt score to audit with"):
        audit(cfg, tmp_path / "audit")
    assert not (tmp_path / "audit").exists()


def test_audit_refuses_a_missing_or_foreign_checkpoint(tmp_path):
    from psdclip.models import load_clip_checkpoint as load_checkpoint

    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not a psdclip training checkpoint"):
        load_checkpoint(tmp_path / "foreign.ckpt")


def test_audit_reads_captions_under_a_json_field_and_counts_what_training_skips(tmp_path):
    """The audit reads and parses samples as training does: ``data.text_key=json:caption`` finds captions in the
    json, and a pair training would skip is skipped and counted by kind."""
    import webdataset as wds

    from psdclip.tools.audit import PairStream
    from tests.helpers.shard_sets import jpeg

    shard = tmp_path / "000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(3):
            meta = {"caption": f"caption {i}", "corrupted": i == 1}
            sink.write({"__key__": f"{i:09d}", "jpg": jpeg(i), "json": json.dumps(meta).encode()})
        sink.write({"__key__": "000000003", "jpg": jpeg(3)[:60], "json": b'{"caption": "cut off"}'})
        sink.write({"__key__": "000000004", "jpg": jpeg(4), "json": b'{"title": "no caption field"}'})
    stream = PairStream([str(shard)], "jpg;png", "json:caption")
    (batch,) = stream.batches(lambda image: image.size, batch_size=8)
    assert stream.skipped == {"image_undecodable": 1, "caption_missing": 1}
    assert [item["caption"] for item in batch] == ["caption 0", "caption 1", "caption 2"]
    assert [item["meta"]["corrupted"] for item in batch] == [False, True, False] and batch[0]["input"] == (8, 8)
