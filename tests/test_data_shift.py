"""The embedded shifted test set: seeded MNIST-C-style corruptions, written as shards, read back, and evaluated for
effective robustness."""

import json

import numpy as np
import pytest
import webdataset as wds
from hydra.utils import instantiate

from psdclip.data.embedded import FashionMNISTShards
from psdclip.data.shift import CORRUPTIONS, check_corruptions, corrupt
from psdclip.eval.model import load_encoders
from tests.conftest import compose_config, tiny_paths


def read_back(shards: FashionMNISTShards) -> list[dict]:
    return list(wds.WebDataset(shards.pattern, shardshuffle=False).decode("l8"))


def garment(seed: int = 0) -> np.ndarray:
    """A 28×28 bright block on black with texture: what each corruption does to it is visible in its statistics."""
    image = np.zeros((28, 28), dtype=np.uint8)
    image[6:22, 9:19] = np.random.default_rng(seed).integers(150, 256, (16, 10))
    return image


def test_each_corruption_does_what_it_is_named_for():
    image, rng = garment(), np.random.default_rng(0)
    assert np.array_equal(CORRUPTIONS["invert"](image, rng), 255 - image)
    low = CORRUPTIONS["contrast"](image, rng)
    assert low.std() < 0.5 * image.std() and abs(float(low.mean()) - float(image.mean())) < 1.0
    noisy = CORRUPTIONS["noise"](image, rng)
    assert noisy.dtype == np.uint8 and (noisy != image).mean() > 0.5
    blurred = CORRUPTIONS["blur"](image, rng).astype(float)
    assert np.abs(np.diff(blurred, axis=1)).sum() < 0.8 * np.abs(np.diff(image.astype(float), axis=1)).sum()
    rotated = CORRUPTIONS["rotate"](image, rng)
    assert rotated.shape == image.shape and (rotated[:6] > 0).any()  # the block's corners swing out of its rows
    for kind, corruption in CORRUPTIONS.items():
        assert corruption(image, rng).dtype == np.uint8, kind


def test_corrupt_is_seeded_and_gives_every_kind_an_equal_share():
    images = np.stack([garment(seed) for seed in range(10)])
    shifted, kinds = corrupt(images, list(CORRUPTIONS), seed=3)
    again, same_kinds = corrupt(images, list(CORRUPTIONS), seed=3)
    assert np.array_equal(shifted, again) and kinds == same_kinds
    assert sorted(kinds) == sorted(list(CORRUPTIONS) * 2)
    other, other_kinds = corrupt(images, list(CORRUPTIONS), seed=4)
    assert other_kinds != kinds or not np.array_equal(other, shifted)


def test_unknown_corruptions_and_shifted_training_data_are_refused(fashion_mnist_dir, tmp_path):
    with pytest.raises(ValueError, match=r"unknown image corruptions \['fog'\]; choose from \['rotate'"):
        check_corruptions(["rotate", "fog"])
    with pytest.raises(ValueError, match="shifted evaluation split: use them on val or test"):
        FashionMNISTShards("train", str(fashion_mnist_dir), str(tmp_path), shift=("blur",))


def test_the_shifted_split_is_the_test_images_corrupted_with_their_labels_and_captions(fashion_mnist_dir, tmp_path):
    clean = FashionMNISTShards("test", str(fashion_mnist_dir), str(tmp_path))
    shifted = FashionMNISTShards("test", str(fashion_mnist_dir), str(tmp_path), shift=tuple(CORRUPTIONS))
    clean.ensure(), shifted.ensure()
    assert shifted.directory != clean.directory and shifted.directory.name.startswith("test-shifted-")
    plain, moved = read_back(clean), read_back(shifted)
    assert [s["__key__"] for s in moved] == [s["__key__"] for s in plain] and len(moved) == clean.num_samples
    assert [s["cls"] for s in moved] == [s["cls"] for s in plain] and [s["txt"] for s in moved] == [
        s["txt"] for s in plain
    ]
    # the images are the clean ones under the corruptions their json names, as corrupt() draws them, losslessly
    expected, kinds = corrupt(np.stack([s["png"] for s in plain]), tuple(CORRUPTIONS), clean.seed)
    assert [s["json"]["corruption"] for s in moved] == kinds
    assert np.array_equal(np.stack([s["png"] for s in moved]), expected)
    assert {k: v for k, v in moved[0]["json"].items() if k != "corruption"} == plain[0]["json"]
    assert json.loads((shifted.directory / "manifest.json").read_text())["shift"] == list(CORRUPTIONS)


def test_evaluation_shifted_reports_zero_shot_on_the_shifted_set_and_effective_robustness(fashion_mnist_dir, tmp_path):
    cfg = compose_config(
        [*tiny_paths(fashion_mnist_dir, tmp_path), "evaluation=shifted", "evaluation.tasks=[zeroshot]"]
    )
    assert list(cfg.evaluation.datasets) == ["fashion_mnist", "fashion_mnist_val", "fashion_mnist_shifted"]
    metrics = instantiate(cfg.evaluation).run(load_encoders(name="psdclip-vit-tiny").eval())
    shifted = metrics["eval/fashion_mnist_shifted/zeroshot_top1"]
    assert 0.0 <= shifted <= 1.0 and "eval/fashion_mnist/zeroshot_top1" in metrics
    assert metrics["eval/robustness/shifted_average"] == pytest.approx(shifted)
