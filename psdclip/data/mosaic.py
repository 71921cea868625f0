"""The embedded mosaic dataset: 2×2 mosaics of four Fashion-MNIST items, each captioned by naming all four.

Every caption of ``data=embedded`` is a class template, so an image's own captions are those of its classmates and
retrieval there is at chance by construction. A mosaic's caption names its four items in reading order (top left, top
right, bottom left, bottom right) through varied templates; with 10⁴ ordered class combinations most captions fit few
images, so retrieval is instance-level. Shards are written and cached by ``FashionMNISTShards`` (same writer, same
cache, a folder of their own); this module only says what a mosaic sample is.
"""

import json
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
from PIL import Image

from psdclip.data.embedded import (
    CLASSNAMES,
    RESOURCES,
    TEST_CAPTIONS_PER_IMAGE,
    EmbeddedDataModule,
    FashionMNISTShards,
)
from psdclip.data.sources import read_lines
from psdclip.data.writer import encode_image

MOSAIC_TEMPLATES = read_lines(RESOURCES / "mosaic_caption_templates.txt")
ITEMS = 4  # a 2×2 grid, in reading order
MOSAIC_FORMAT_VERSION = 1  # bump when the mosaic shard contents change for the same settings
# what a wrong caption is: one item named as another class (a partial correspondence, the commonest web caption
# error), another mosaic's caption, or every item named as another class
MOSAIC_NOISE_KINDS = ("partial", "swap", "flip")


def with_article(classname: str) -> str:
    return f"{'an' if classname[0] in 'aeiou' else 'a'} {classname}"


def mosaic_caption(template: str, labels) -> str:
    """``template`` naming the classes ``labels`` in reading order (slots ``{a}``…``{d}``)."""
    return template.format(**{slot: with_article(CLASSNAMES[label]) for slot, label in zip("abcd", labels)})


def tile(items: np.ndarray) -> np.ndarray:
    """Four (H, W) items → one (2H, 2W) mosaic, in reading order."""
    return np.block([[items[0], items[1]], [items[2], items[3]]])


def other_classes(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each label, a uniformly drawn different class."""
    return (labels + rng.integers(1, len(CLASSNAMES), labels.shape)) % len(CLASSNAMES)


@dataclass(frozen=True)
class MosaicShards(FashionMNISTShards):
    """One split as captioned 2×2 mosaics of its items: ``size`` mosaics (None: as many as the split has items).

    Each sample: ``png`` (56×56 grayscale), ``txt`` (caption), ``cls`` (the top-left item's class, what zero-shot
    classifies) and ``json`` with ``labels`` (the four classes in reading order), ``caption_labels`` (the classes the
    caption names), ``wrong_positions`` (where the two differ), ``corrupted`` and ``items`` (the idx rows tiled). A
    fraction ``noise`` of the train captions is wrong, of kind ``partial`` (one item, at a uniformly drawn position,
    named as another class), ``swap`` (the caption of another mosaic with other classes, ``swapped_from``) or ``flip``
    (every item named as another class). Validation and test captions are clean, several per mosaic (``captions``).
    """

    noise_kind: str = "partial"
    cache_folder: ClassVar[str] = "fashion_mosaic"
    noise_kinds: ClassVar[tuple[str, ...]] = MOSAIC_NOISE_KINDS

    @cached_property
    def rows(self) -> range:
        return self.split_rows  # the items mosaics are drawn from: all of the split's

    @property
    def num_samples(self) -> int:
        return self.size or len(self.rows)

    def cache_settings(self) -> dict:
        return {
            **super().cache_settings(),
            "mosaics": self.num_samples,
            "mosaic_templates": MOSAIC_TEMPLATES,
            "mosaic_version": MOSAIC_FORMAT_VERSION,
        }

    def _samples(self, images: np.ndarray, labels: np.ndarray):
        rng = np.random.default_rng(self.seed)
        count = self.num_samples
        items = rng.integers(len(labels), size=(count, ITEMS))
        mosaic_labels = labels[items].astype(np.int64)
        corrupted = rng.random(count) < (self.noise if self.noisy else 0.0)
        templates = np.stack(
            [rng.choice(len(MOSAIC_TEMPLATES), TEST_CAPTIONS_PER_IMAGE, replace=False) for _ in range(count)]
        )
        caption_labels, donors = (
            mosaic_labels.copy(),
            np.arange(count),
        )  # a clean caption is its own mosaic's
        wrong = np.flatnonzero(corrupted)
        if self.noise_kind == "partial":
            positions = rng.integers(ITEMS, size=len(wrong))
            caption_labels[wrong, positions] = other_classes(mosaic_labels[wrong, positions], rng)
        elif self.noise_kind == "flip":
            caption_labels[wrong] = other_classes(mosaic_labels[wrong], rng)
        else:
            donors[wrong] = rng.integers(count, size=len(wrong))
            # redraw donors with the very same four classes, so that every swapped caption is wrong somewhere
            while len(same := wrong[(mosaic_labels[donors[wrong]] == mosaic_labels[wrong]).all(axis=1)]):
                donors[same] = rng.integers(count, size=len(same))
            caption_labels[wrong] = mosaic_labels[donors[wrong]]
        for index in range(count):
            # a swapped caption is the donor's own first caption: its template and its classes
            caption = mosaic_caption(MOSAIC_TEMPLATES[templates[donors[index], 0]], caption_labels[index])
            meta = {
                "labels": mosaic_labels[index].tolist(),
                "caption_labels": caption_labels[index].tolist(),
                "wrong_positions": np.flatnonzero(caption_labels[index] != mosaic_labels[index]).tolist(),
                "corrupted": bool(corrupted[index]),
                "items": [self.rows[item] for item in items[index]],
            }
            if self.noise_kind == "swap" and corrupted[index]:
                meta["swapped_from"] = int(donors[index])
            if self.split != "train":
                meta["captions"] = [mosaic_caption(MOSAIC_TEMPLATES[t], mosaic_labels[index]) for t in templates[index]]
            yield {
                "__key__": f"{index:06d}",
                "png": encode_image(Image.fromarray(tile(images[items[index]]), mode="L")),
                "txt": caption,
                "cls": str(mosaic_labels[index, 0]),
                "json": json.dumps(meta),
            }


class MosaicDataModule(EmbeddedDataModule):
    """``data=embedded_mosaic``: ``train_size`` train mosaics (None: 55k) with ``noise`` of the captions wrong."""

    shards_class = MosaicShards
