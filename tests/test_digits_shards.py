"""docs/digits_shards.py, the study's second dataset: its caption noise, and shards and an evaluation folder that
train.py's data=shards and ImageFolderEvalSet read."""

import importlib.util
import json
import re
import sys

import numpy as np
import webdataset as wds

from psdclip.eval.datasets import ImageFolderEvalSet
from tests.helpers.processes import ROOT, run_in_session

SCRIPT = ROOT / "docs" / "digits_shards.py"
spec = importlib.util.spec_from_file_location("digits_shards", SCRIPT)
digits_shards = importlib.util.module_from_spec(spec)
spec.loader.exec_module(digits_shards)


def named_digit(caption: str) -> int:
    words = set(re.findall(r"[a-z]+", caption))
    (digit,) = [i for i, name in enumerate(digits_shards.CLASSNAMES) if name in words]
    return digit


def test_flipped_captions_name_another_digit_and_follow_the_seed():
    labels = np.arange(2000) % 10
    texts, wrong = digits_shards.captions(labels, 0.4, "flip", seed=3)
    assert abs(wrong.mean() - 0.4) < 0.04
    named = np.array([named_digit(text) for text in texts])
    assert (named[wrong] != labels[wrong]).all() and (named[~wrong] == labels[~wrong]).all()
    again, wrong_again = digits_shards.captions(labels, 0.4, "flip", seed=3)
    assert again == texts and (wrong_again == wrong).all()
    assert digits_shards.captions(labels, 0.4, "flip", seed=4)[0] != texts


def test_swapped_captions_are_another_digits_clean_caption():
    labels = np.arange(500) % 10
    texts, wrong = digits_shards.captions(labels, 0.4, "swap", seed=0)
    clean, _ = digits_shards.captions(labels, 0.0, "swap", seed=0)
    named = np.array([named_digit(text) for text in texts])
    assert wrong.any() and (named[wrong] != labels[wrong]).all() and (named[~wrong] == labels[~wrong]).all()
    # the same seed draws the same templates, so every clean caption is unchanged and a swapped one is a clean one
    assert all(texts[i] == clean[i] for i in np.flatnonzero(~wrong))
    assert {texts[i] for i in np.flatnonzero(wrong)} <= set(clean)


def test_writes_marked_training_shards_and_an_evaluation_folder(tmp_path):
    done = run_in_session(
        [sys.executable, str(SCRIPT), str(tmp_path), "--noise", "0.4", "--kind", "flip", "--seed", "1"], timeout=120
    )
    assert done.returncode == 0, done.stdout
    sizes = json.loads((tmp_path / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == 1797 - digits_shards.TEST_IMAGES
    samples = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "train").glob("*.tar")), shardshuffle=False))
    meta = [json.loads(sample["json"]) for sample in samples]
    corrupted = np.array([m["corrupted"] for m in meta])
    named = np.array([named_digit(sample["txt"].decode()) for sample in samples])
    assert ((named != [m["label"] for m in meta]) == corrupted).all() and 0.35 < corrupted.mean() < 0.45
    evaluation = ImageFolderEvalSet(str(tmp_path / "eval"))
    assert evaluation.classnames == sorted(digits_shards.CLASSNAMES) and evaluation.has_split("train")
    assert len(list((tmp_path / "eval" / "test").rglob("*.png"))) == digits_shards.TEST_IMAGES
    assert (tmp_path / "eval" / "zeroshot_classification_templates.txt").read_text().splitlines() == (
        digits_shards.ZEROSHOT_TEMPLATES
    )
