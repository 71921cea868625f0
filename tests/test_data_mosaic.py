"""The embedded mosaics: deterministic images and captions, json flags that match the captions, the cache key, and
retrieval on a tiny mosaic set against a hand count."""

import re

import numpy as np
import pytest
import torch
import webdataset as wds
from torchvision.transforms import PILToTensor

from psdclip.data.embedded import CLASSNAMES, FashionMNISTShards, read_idx
from psdclip.data.mosaic import MOSAIC_TEMPLATES, MosaicShards, mosaic_caption, tile
from psdclip.eval.datasets import FashionMosaicEvalSet
from psdclip.eval.suite import EvalSuite
from tests.conftest import make_fashion_mnist


def read_samples(shards, decode: bool = True):
    """The shards' samples (written first if needed): images as uint8 arrays and parsed json, or the raw bytes."""
    shards.ensure()
    stages = [
        wds.SimpleShardList(shards.pattern),
        wds.tarfile_to_samples(),
        *([wds.decode("l8")] if decode else []),
    ]
    return list(wds.DataPipeline(*stages))


def test_mosaics_and_captions_are_deterministic_for_a_seed(fashion_mnist_dir, tmp_path):
    def build(cache, seed):
        shards = MosaicShards(
            "train",
            str(fashion_mnist_dir),
            str(tmp_path / cache),
            noise=0.5,
            seed=seed,
            size=40,
        )
        return read_samples(shards, decode=False)

    first, again, other = build("a", 0), build("b", 0), build("c", 1)
    fields = ("png", "txt", "json")
    assert [[s[f] for f in fields] for s in first] == [[s[f] for f in fields] for s in again]
    assert [s["png"] for s in first] != [s["png"] for s in other]
    assert [s["txt"] for s in first] != [s["txt"] for s in other]


def test_a_mosaic_tiles_its_four_items_in_reading_order(fashion_mnist_dir, tmp_path):
    images = read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz")
    for sample in read_samples(MosaicShards("test", str(fashion_mnist_dir), str(tmp_path), size=10)):
        meta, pixels = sample["json"], sample["png"]
        assert pixels.shape == (56, 56)
        assert np.array_equal(pixels[:28, 28:], images[meta["items"][1]])  # top right is the second item
        assert np.array_equal(pixels, tile(images[meta["items"]]))
        assert meta["labels"] == labels[meta["items"]].tolist() and int(sample["cls"]) == meta["labels"][0]
        # clean test captions: five templates, each naming the four items in reading order
        assert meta["captions"][0] == sample["txt"] and len(set(meta["captions"])) == 5
        assert set(meta["captions"]) <= {mosaic_caption(t, meta["labels"]) for t in MOSAIC_TEMPLATES}
        assert not meta["corrupted"] and meta["wrong_positions"] == []


@pytest.mark.parametrize("kind, wrong_count", [("partial", {1}), ("flip", {4}), ("swap", {1, 2, 3, 4})])
def test_json_flags_match_the_captions(fashion_mnist_dir, tmp_path, kind, wrong_count):
    shards = MosaicShards(
        "train",
        str(fashion_mnist_dir),
        str(tmp_path),
        noise=0.4,
        noise_kind=kind,
        size=300,
    )
    samples = read_samples(shards)
    assert f"-{kind}-" in shards.directory.name and len(samples) == 300
    assert abs(np.mean([s["json"]["corrupted"] for s in samples]) - 0.4) < 0.08
    for sample in samples:
        meta = sample["json"]
        # the caption names exactly the caption labels, in reading order, through one of the templates
        assert sample["txt"] in {mosaic_caption(t, meta["caption_labels"]) for t in MOSAIC_TEMPLATES}
        wrong = [p for p in range(4) if meta["caption_labels"][p] != meta["labels"][p]]
        assert meta["wrong_positions"] == wrong
        assert meta["corrupted"] == bool(wrong)
        if meta["corrupted"]:
            assert len(wrong) in wrong_count
        if kind == "swap" and meta["corrupted"]:
            donor = samples[meta["swapped_from"]]
            assert meta["caption_labels"] == donor["json"]["labels"]
            assert donor["json"]["corrupted"] or donor["txt"] == sample["txt"]  # the donor's own caption


def test_the_cache_key_separates_the_datasets_and_the_noise_kinds(fashion_mnist_dir, tmp_path):
    source, cache = str(fashion_mnist_dir), str(tmp_path)
    folders = {
        "embedded": FashionMNISTShards("train", source, cache, noise=0.4, noise_kind="swap").directory,
        "mosaic swap": MosaicShards("train", source, cache, noise=0.4, noise_kind="swap").directory,
        "mosaic partial": MosaicShards("train", source, cache, noise=0.4, noise_kind="partial").directory,
        "mosaic flip": MosaicShards("train", source, cache, noise=0.4, noise_kind="flip").directory,
        "fewer mosaics": MosaicShards("train", source, cache, noise=0.4, noise_kind="flip", size=100).directory,
    }
    assert len(set(folders.values())) == len(folders)
    assert folders["embedded"].parent.name == "fashion_mnist" and folders["mosaic swap"].parent.name == "fashion_mosaic"
    # clean captions do not depend on the kind of noise they were spared
    assert (
        MosaicShards("test", source, cache, noise_kind="swap").directory
        == MosaicShards("test", source, cache).directory
    )
    with pytest.raises(
        ValueError,
        match="unknown data.noise_kind 'generic'; choose one of \\('partial', 'swap', 'flip'\\)",
    ):
        MosaicShards("train", source, cache, noise=0.4, noise_kind="generic")


# a class name as a caption names it: after its article, so that "a shirt" is not found inside "a t-shirt"
NAMED = re.compile(r"\ban? (" + "|".join(sorted(map(re.escape, CLASSNAMES), key=len, reverse=True)) + r")\b")


class FirstTwoItemsOracle:
    """A model whose image features are the four tiles' classes (one-hot per position, read off the pixels: class k
    lights rows 2+2k..4+2k of its tile) and whose text features are only the first two classes a text names, as a
    text tower that truncates might: a caption then fits every mosaic with the same top row equally well."""

    eval_transform = PILToTensor()

    def __init__(self):
        self.texts: list[str] = []

    def tokenizer(self, texts):
        self.texts += texts
        return torch.arange(len(self.texts) - len(texts), len(self.texts))

    def encode_image(self, images):
        features = torch.zeros(len(images), 4, len(CLASSNAMES))
        for position in range(4):
            rows, columns = divmod(position, 2)
            tiles = images[:, 0, 28 * rows : 28 * rows + 28, 28 * columns : 28 * columns + 28].float()
            band = tiles.mean(dim=2).unfold(1, 3, 1).mean(dim=2)  # brightness of every 3-row band
            features[torch.arange(len(images)), position, (band.argmax(dim=1) - 2) // 2] = 1
        return features.flatten(1)

    def encode_text(self, tokens):
        features = torch.zeros(len(tokens), 4, len(CLASSNAMES))
        for row, token in enumerate(tokens.tolist()):
            for position, name in enumerate(NAMED.findall(self.texts[token])[:2]):
                features[row, position, CLASSNAMES.index(name)] = 1
        return features.flatten(1)


def test_retrieval_on_a_tiny_mosaic_set_against_a_hand_count(tmp_path):
    source = make_fashion_mnist(tmp_path / "idx", test=3)  # three test items, of classes 0, 1, 2
    evaluation = FashionMosaicEvalSet(str(source), str(tmp_path / "cache"), mosaics=6, retrieval_images=6)
    suite = EvalSuite({"mosaic": evaluation}, ["zeroshot", "retrieval"], batch_size=4)
    metrics = suite.run(FirstTwoItemsOracle())
    labels = [sample["json"]["labels"] for sample in read_samples(evaluation.splits["test"])]
    assert labels == [
        [2, 1, 1, 0],
        [0, 0, 0, 0],
        [0, 2, 1, 2],
        [1, 1, 2, 2],
        [1, 1, 1, 2],
        [0, 2, 2, 0],
    ]
    # top rows (2,1) (0,0) (0,2) (1,1) (1,1) (0,2): mosaics 3 and 4 tie, and 2 and 5; ties go to the lower index.
    # text→image, 5 captions per mosaic: those of mosaics 4 and 5 rank their image second → R@1 = 20/30, R@5 = 1
    assert metrics["eval/mosaic/retrieval_t2i_r1"] == pytest.approx(20 / 30)
    assert metrics["eval/mosaic/retrieval_t2i_r5"] == 1.0
    # image→text: mosaic 4 finds mosaic 3's five captions first (and 5 those of 2) → rank 5: R@1 = R@5 = 4/6, R@10 = 1
    assert metrics["eval/mosaic/retrieval_i2t_r1"] == pytest.approx(4 / 6)
    assert metrics["eval/mosaic/retrieval_i2t_r5"] == pytest.approx(4 / 6)
    assert metrics["eval/mosaic/retrieval_i2t_r10"] == 1.0
    # zero-shot of the top-left item: a one-class prompt is that class at the first position
    assert metrics["eval/mosaic/zeroshot_top1"] == 1.0
