"""Bad input is refused or counted with one clear line (issue 12, items 5, 8, 9 and 10): shard folders that already
hold shards, non-UTF-8 captions, brace patterns on the command line, settings that cannot work, start-up errors
without their stack, config errors before torch loads, weights of another architecture, evaluation sets with nothing
to evaluate.

Command-line runs are real subprocesses, each in its own session, killed with their children when a test ends.
"""

import csv
import json
import re
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds

from psdclip.data.make_shards import main as make_shards
from psdclip.eval.datasets import WdsEvalSet
from psdclip.eval.model import load_encoders
from psdclip.eval.suite import EvalSuite
from psdclip.models import create_clip, read_checkpoint
from tests.conftest import tiny_run_overrides
from tests.helpers.checkpoints import save_tiny_checkpoint
from tests.helpers.processes import checkout_env, run_in_session
from tests.helpers.shard_sets import jpeg, write_set

ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    args: list[str], tmp_path: Path, full_error: bool = False, timeout: float = 180
) -> tuple[subprocess.CompletedProcess, float]:
    """``python <args>`` from the repository root; the completed process and its wall time in seconds."""
    env = checkout_env()
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    started = time.monotonic()
    done = run_in_session(
        [sys.executable, *args, f"hydra.run.dir={tmp_path / 'run'}"], timeout, env, merge_output=False
    )
    return done, time.monotonic() - started


def tiny_paths(tmp_path: Path, fashion_mnist_dir: Path) -> list[str]:
    return [*tiny_run_overrides(fashion_mnist_dir, tmp_path), "trainer.max_steps=1"]


# ---------------------------------------------------------------- item 5: make_shards into a folder with shards


def photos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"p{i}.jpg").write_bytes(jpeg(i))
        (folder / f"p{i}.txt").write_text(f"photo {folder.name} {i}")
    return folder


def shard_keys(folder: Path) -> list[str]:
    return [sample["__key__"] for sample in wds.WebDataset(sorted(map(str, folder.glob("*.tar"))), shardshuffle=False)]


def test_make_shards_refuses_a_folder_with_shards_unless_overwrite_or_append(tmp_path, capsys):
    out = tmp_path / "out"
    make_shards([str(photos(tmp_path / "old", 6)), str(out), "--shard-size", "2"])  # 3 shards
    new = photos(tmp_path / "new", 2)
    with pytest.raises(SystemExit, match=f"{out} is not empty .* --overwrite .* --append"):
        make_shards([str(new), str(out), "--shard-size", "2"])
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]  # untouched

    make_shards([str(new), str(out), "--shard-size", "2", "--append"])
    assert json.loads((out / "sizes.json").read_text()) == {f"{i:06d}.tar": 2 for i in range(4)}
    keys = shard_keys(out)
    assert len(keys) == len(set(keys)) == 8  # the new samples' keys follow the old ones
    printed = capsys.readouterr().out
    assert f"\"data.train_shards='{out}/{{000000..000003}}.tar'\"" in printed  # every shard, quoted for shell and Hydra

    make_shards([str(new), str(out), "--shard-size", "2", "--overwrite"])
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar"]  # no stale shards left
    assert json.loads((out / "sizes.json").read_text()) == {"000000.tar": 2}


def test_make_shards_counts_non_utf8_captions_as_the_training_reader_does(tmp_path, capsys):
    source = photos(tmp_path / "photos", 3)
    (source / "p1.txt").write_bytes("café crème".encode("latin-1"))
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="", encoding="latin-1") as f:
        writer = csv.writer(f)
        writer.writerows(
            [["image", "caption"], [str(source / "p0.jpg"), "a fine photo"], [str(source / "p2.jpg"), "crème brûlée"]]
        )

    for given, out in ((source, tmp_path / "from_folder"), (table, tmp_path / "from_table")):
        sizes = make_shards([str(given), str(out)])
        assert sum(sizes.values()) == (2 if given == source else 1)
        captions = [sample["txt"] for sample in wds.WebDataset(str(out / "000000.tar"), shardshuffle=False)]
        assert not any("\ufffd".encode() in caption for caption in captions)
        assert "skipped: 1 caption not utf8" in capsys.readouterr().out


# ---------------------------------------------------------------- item 8: brace patterns on the command line


def test_unquoted_brace_pattern_names_the_quoted_fix(tmp_path):
    done, _ = run_cli(
        ["train.py", "data=shards", "data.train_shards=/data/cc12m/{00000..01242}.tar"], tmp_path, timeout=120
    )
    assert done.returncode == 1
    assert "\"data.train_shards='/data/cc12m/{00000..01242}.tar'\"" in done.stderr, done.stderr[-2000:]


def test_shell_expanded_brace_pattern_is_refused(tmp_path):
    """An unquoted pattern in bash arrives as one override per shard, of which Hydra would keep the last."""
    expanded = [f"data.train_shards=/data/cc12m/{i:05d}.tar" for i in range(3)]
    done, _ = run_cli(["train.py", "--cfg", "job", "data=shards", *expanded], tmp_path, timeout=120)
    assert done.returncode == 1, done.stdout[-1000:]
    assert "error: data.train_shards is given 3 times" in done.stderr and "quote it" in done.stderr


def test_documented_brace_pattern_commands_work(tmp_path):
    """The brace-pattern commands that conf/data/shards.yaml and the README show, split as a shell splits them."""
    shown = [
        line.lstrip("# ")
        for line in (ROOT / "conf/data/shards.yaml").read_text().splitlines()
        if "{" in line and "train.py" in line
    ]
    shown += [
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("python train.py") and "{" in line
    ]
    assert len(shown) >= 2
    for command in shown:
        args = shlex.split(command[command.index("python train.py") :])[
            1:
        ]  # the shell's quote removal; no expansion inside quotes
        done, _ = run_cli([args[0], "--cfg", "job", *args[1:]], tmp_path, timeout=120)
        assert done.returncode == 0, f"{command}: {done.stderr[-1500:]}"
        pattern = next(arg for arg in args if arg.startswith("data.train_shards=")).split("=", 1)[1].strip("'")
        assert f"train_shards: {pattern}" in done.stdout


# ---------------------------------------------------------------- item 9: settings, start-up errors, latency


@pytest.mark.parametrize("setting", ["optim.optimizer.lr=-1", "data.num_workers=-1"])
def test_invalid_settings_are_named_before_torch_loads(setting, tmp_path, fashion_mnist_dir):
    done, seconds = run_cli(
        ["-X", "importtime", "train.py", *tiny_paths(tmp_path, fashion_mnist_dir), setting], tmp_path
    )
    errors = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 1
    assert errors[0].startswith(f"error: {setting} cannot work: give "), "\n".join(errors[-20:])
    assert len(errors) == 2 and "HYDRA_FULL_ERROR=1" in errors[1]  # the message and the hint, no stack
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "lightning" not in imported
    print(f"{setting}: error after {seconds:.1f} s")


@pytest.mark.parametrize("case", ["empty shard folder", "unknown model (inside Hydra's instantiate)"])
def test_start_up_errors_print_the_message_and_keep_the_stack_on_request(case, tmp_path, fashion_mnist_dir):
    (tmp_path / "empty").mkdir()
    overrides, message = {
        "empty shard folder": (
            ["data=shards", f"data.train_shards={tmp_path / 'empty'}", "evaluation=default"],
            f"error: shard pattern '{tmp_path / 'empty'}' names no shards",
        ),
        "unknown model (inside Hydra's instantiate)": (
            ["model.name=no-such-model"],
            "error: unknown model 'no-such-model'",
        ),
    }[case]
    args = ["train.py", *tiny_paths(tmp_path, fashion_mnist_dir), *overrides, "~callbacks.evaluation"]
    done, _ = run_cli(args, tmp_path)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr and "HYDRA_FULL_ERROR=1" in done.stderr, (
        done.stderr[-3000:]
    )
    full, _ = run_cli(args, tmp_path, full_error=True)
    assert full.returncode == 1 and "Traceback" in full.stderr


# ---------------------------------------------------------------- item 10: evaluate.py


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny model saved as train.py saves it, and its open_clip weights as a plain state dict."""
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")
    torch.save(read_checkpoint(path)[1], path.with_name("tiny_open_clip.pt"))
    return path


def test_weights_of_another_architecture_are_named_in_one_line(tiny_checkpoint, tmp_path, fashion_mnist_dir):
    weights = tiny_checkpoint.with_name("tiny_open_clip.pt")
    done, _ = run_cli(
        [
            "evaluate.py",
            "model.name=ViT-B-32",
            f"model.pretrained={weights}",
            "evaluation=default",
            f"paths.fashion_mnist_dir={fashion_mnist_dir}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ],
        tmp_path,
    )
    assert done.returncode == 1
    expected = f"error: {weights} holds a psdclip-vit-tiny model, but model.name=ViT-B-32 was asked: set model.name=psdclip-vit-tiny"
    assert expected in done.stderr.splitlines(), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Missing key" not in done.stderr
    with pytest.raises(
        ValueError, match=re.escape(f"{tiny_checkpoint} holds a psdclip-vit-tiny model, but model.name=ViT-B-32")
    ):
        load_encoders(
            str(tiny_checkpoint), "ViT-B-32"
        )  # the checkpoint's own architecture would have been used silently
    with pytest.raises(
        ValueError, match=re.escape(f"{tiny_checkpoint} holds a psdclip-vit-tiny model, but model.name=ViT-B-16")
    ):
        create_clip("ViT-B-16", str(tiny_checkpoint))


def test_an_evaluation_set_with_nothing_to_evaluate_is_an_error(tiny_checkpoint, tmp_path):
    root = tmp_path / "wds_hollow"
    (root / "test").mkdir(parents=True)  # empty, and no templates file: no task can run
    model = load_encoders(str(tiny_checkpoint))
    with pytest.raises(
        ValueError, match=re.escape(f"evaluation set hollow ({root}) supports no task: zero-shot needs {root}")
    ):
        EvalSuite({"hollow": WdsEvalSet(str(root))}, ["zeroshot"], batch_size=256).run(model)


@pytest.mark.slow
def test_a_missing_evaluation_set_stops_a_web_scale_run_at_start_up_naming_the_folder(tmp_path):
    write_set(tmp_path / "data" / "cc12m", [6])
    args = ["train.py", "data=cc12m", "trainer=cpu", "model=vit_tiny", "trainer.max_steps=1", "data.batch_size=4"]
    args += [f"paths.data_root={tmp_path / 'data'}", f"paths.eval_root={tmp_path / 'eval'}"]
    done, _ = run_cli([*args, f"paths.log_dir={tmp_path / 'logs'}"], tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    expected = (
        f"error: evaluation dataset folder not found: {tmp_path / 'eval' / 'wds_imagenet1k'}; prepare it under "
        "paths.eval_root as docs/evaluation_datasets.md describes, or leave the set out: evaluation/datasets=[…] "
        "lists the sets to keep (~callbacks.evaluation evaluates nothing)"
    )
    assert done.returncode == 1 and errors == [expected], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not list((tmp_path / "logs").rglob("*.ckpt"))  # before any step


def test_a_sweep_objective_the_run_did_not_measure_raises():
    from omegaconf import OmegaConf

    from psdclip.run.cli import sweep_objective

    cfg = OmegaConf.create({"optimized_metric": "eval/imagenet1k/zeroshot_top1"})
    metrics = {"eval/fashion_mnist/zeroshot_top1": 0.8, "train/loss": 2.0}
    with pytest.raises(ValueError, match=r"'eval/imagenet1k/zeroshot_top1' was not measured.*fashion_mnist/zeroshot"):
        sweep_objective(cfg, metrics, sweeping=True)
    assert sweep_objective(cfg, metrics, sweeping=False) is None  # a single run still ends normally
    assert sweep_objective(OmegaConf.create({"optimized_metric": "train/loss"}), metrics, sweeping=True) == 2.0


def test_an_evaluation_shard_cut_off_midway_stops_the_evaluation_naming_it(tmp_path):
    """Evaluation sets are read with the training reader; where training skips and counts a broken shard, an
    evaluation stops: a set with a hole would report wrong numbers."""
    (tmp_path / "test").mkdir()
    shard = tmp_path / "test" / "0.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(20):
            sink.write({"__key__": f"{i:04d}", "jpg": jpeg(i, size=32), "cls": str(i % 2).encode()})
    with tarfile.open(shard) as archive:
        member = archive.getmembers()[20]  # the 11th sample's image
    shard.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])  # cut inside its data
    with pytest.raises(tarfile.ReadError, match=f"evaluation shard {shard}: shard_truncated"):
        for _ in WdsEvalSet(str(tmp_path)).batches("test", lambda image: torch.zeros(1), batch_size=4):
            pass
