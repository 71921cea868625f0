"""The audit as a tool for curating a dataset (issue 41, item 2): on a run's folder it lists what training
remembered, writes the keys to exclude, a page to look at and, on request, a clean copy of the shards that trains;
bad input gets one line.

Command-line runs are real subprocesses, each in its own session, killed with their children when a test ends.
"""

import html.parser
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds

from psdclip.data.writer import write_shards
from psdclip.tools.audit import audit
from tests.conftest import compose_config, tiny_paths
from tests.helpers.checkpoints import save_tiny_checkpoint
from tests.helpers.processes import checkout_env, run_in_session
from tests.helpers.shard_sets import jpeg

MEMORY_RUN = ["loss=psd_memory", "loss.subset.min_sightings=1", "loss.subset.margin=0.1", "data.noise=0.3"]
MEMORY_RUN += ["data.shard_size=100", "data.batch_size=32", "trainer.max_epochs=3", "callbacks.media=null"]


def run_command(args: list[str], timeout: float = 300):
    env = checkout_env()
    env.pop("HYDRA_FULL_ERROR", None)
    return run_in_session([sys.executable, *args], timeout, env, merge_output=False)


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory, fashion_mnist_dir) -> Path:
    """A 3-epoch loss=psd_memory run of the 320 tiny pairs, 30% of their captions wrong, trained as train.py does."""
    root = tmp_path_factory.mktemp("memory_run")
    done = run_command(["train.py", *MEMORY_RUN, *tiny_paths(fashion_mnist_dir, root), f"hydra.run.dir={root / 'run'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


class SuspectsPage(html.parser.HTMLParser):
    """The figures of suspects.html: each one's image source, caption and whether it is marked flagged."""

    def __init__(self, text: str):
        super().__init__()
        self.figures: list[dict] = []
        self.in_caption = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.figures.append({"flagged": attrs.get("class") == "flagged", "caption": ""})
        elif tag == "img":
            self.figures[-1]["src"] = attrs["src"]
        self.in_caption = tag == "q"

    def handle_endtag(self, tag):
        self.in_caption = self.in_caption and tag != "q"

    def handle_data(self, data):
        if self.in_caption:
            self.figures[-1]["caption"] += data


@pytest.mark.slow
def test_the_audit_of_a_run_lists_excludes_shows_and_copies_clean_shards(memory_run, fashion_mnist_dir, tmp_path):
    clean = tmp_path / "clean"
    cfg = compose_config([f"run={memory_run}", f"clean_copy={clean}", "grid=20"], name="audit")
    report = audit(cfg, tmp_path / "audit")
    table = pd.read_csv(tmp_path / "audit" / "memory.csv", dtype={"key": str})
    assert len(table) == 320 and report["memory"]["pairs"] == 320 - table["threshold_pair"].sum()
    # what the run's last epoch logged: the estimate, its range and standard error
    logged = pd.read_csv(memory_run / "csv" / "metrics.csv")
    for name in ("noise_estimate", "noise_estimate_se", "noise_estimate_low", "noise_estimate_high"):
        assert report["memory"][name] == pytest.approx(logged[f"train/{name}"].dropna().iloc[-1], abs=1e-6), name
    assert report["memory"]["noise_estimate_low"] <= report["memory"]["noise_estimate"]
    # the keys to exclude are the flagged pairs, which data.exclude_keys reads
    flagged = table[table["flagged"]]
    excluded = pd.read_csv(tmp_path / "audit" / "exclude.csv", dtype={"key": str})
    assert list(excluded.columns) == ["shard", "key"] and len(excluded) == report["memory"]["flagged"] > 0
    assert set(zip(excluded["shard"], excluded["key"])) == set(zip(flagged["shard"], flagged["key"]))
    # the page shows the most suspect of the data's own pairs, in order, each with its image
    own = table[~table["threshold_pair"]].dropna(subset=["remembered_gap"]).head(20)
    page = SuspectsPage((tmp_path / "audit" / "suspects.html").read_text())
    assert [figure["caption"] for figure in page.figures] == own["caption"].tolist()
    assert [figure["flagged"] for figure in page.figures] == own["flagged"].tolist()
    assert all(figure["src"].startswith("data:image/png;base64,") for figure in page.figures)
    # the clean copy: every pair but the flagged ones, every file unchanged, sizes listed
    source = {s["__key__"]: s for s in read_shards(Path(table["shard"].iloc[0]).parent)}
    copied = {s["__key__"]: s for s in read_shards(clean)}
    assert copied.keys() == source.keys() - set(flagged["key"])
    assert all(copied[key]["txt"] == source[key]["txt"] and copied[key]["png"] == source[key]["png"] for key in copied)
    assert sum(json.loads((clean / "sizes.json").read_text()).values()) == len(copied) == report["clean_copy"]["pairs"]
    # … and trains
    done = run_command(
        [
            "train.py",
            "data=shards",
            f"data.train_shards={clean}",
            "model=vit_tiny",
            "evaluation=default",
            "data.batch_size=16",
            "trainer.max_steps=2",
            "callbacks.media=null",
            *tiny_paths(fashion_mnist_dir, tmp_path),
            f"hydra.run.dir={tmp_path / 'retrained'}",
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "retrained" / "summary.json").read_text())["steps"] == 2


def read_shards(folder: Path) -> list[dict]:
    return list(wds.WebDataset(sorted(str(path) for path in folder.glob("*.tar")), shardshuffle=False))


def captionless_shards(folder: Path) -> Path:
    write_shards(({"__key__": f"{i:04d}", "jpg": jpeg(i)} for i in range(8)), folder, shard_size=8)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("case", ["other data", "no captions", "not a training checkpoint", "no memory"])
def test_bad_audit_input_gets_one_line(case, memory_run, fashion_mnist_dir, tmp_path):
    checkpoint = memory_run / "checkpoints" / "last.ckpt"
    paths = [*tiny_paths(fashion_mnist_dir, tmp_path), "data.shard_size=100"]
    args, message = {
        "other data": (
            [f"ckpt={checkpoint}", "data.train_size=100", *paths],
            "the checkpoint's pair memory holds 320 pairs but the shards hold 100: it was trained on other data",
        ),
        "no captions": (
            [
                f"ckpt={save_tiny_checkpoint(tmp_path / 'clip.ckpt')}",
                "data=shards",
                f"data.train_shards={captionless_shards(tmp_path / 'bare')}",
            ],
            "no readable image–caption pairs in",
        ),
        "not a training checkpoint": (
            [f"ckpt={fashion_mnist_dir / 'train-labels-idx1-ubyte.gz'}", *paths],
            "is not a complete checkpoint",
        ),
        "no memory": (
            [f"ckpt={save_tiny_checkpoint(tmp_path / 'clip.ckpt')}", "score=false", *paths],
            "holds no pair memory (its run did not train with loss=psd_memory): audit it with score=true",
        ),
    }[case]
    done = run_command(["-m", "psdclip.tools.audit", *args, f"hydra.run.dir={tmp_path / 'audit'}"])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1 and message in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
