"""The embedded default dataset: Fashion-MNIST written as captioned webdataset shards, with caption noise.

Splits: ``train`` (the first 11/12 of Fashion-MNIST's training images, optionally only the first ``size``),
``val`` (the last 1/12, clean captions, never trained on: for choosing settings) and ``test`` (the 10k test images,
clean captions). Shards land in a cache folder named by a hash of every setting that shapes them, so a changed
setting builds a new folder and an unchanged one is reused.
"""

import gzip
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from psdclip.data.datamodule import ShardDataModule
from psdclip.data.shift import check_corruptions, corrupt
from psdclip.data.sources import read_lines
from psdclip.data.writer import encode_image, write_shards
from psdclip.run.runlog import Progress

log = logging.getLogger(__name__)

RESOURCES = Path(__file__).parent / "fashion_mnist"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FORMAT_VERSION = 2  # bump when the shard contents change for the same settings
TEST_CAPTIONS_PER_IMAGE = 5
SPLITS = ("train", "val", "test")
VAL_FRACTION = 1 / 12  # of Fashion-MNIST's training images: 5000 of 60000
# what a wrong caption is: another class's name, another image's caption, or text that says nothing of the image
NOISE_KINDS = ("flip", "swap", "generic")


CLASSNAMES = read_lines(RESOURCES / "classnames.txt")
CAPTION_TEMPLATES = read_lines(RESOURCES / "caption_templates.txt")
GENERIC_CAPTIONS = read_lines(RESOURCES / "generic_captions.txt")


def _open_idx(path: Path):
    return (gzip.open if path.suffix == ".gz" else open)(path, "rb")


def idx_shape(header: bytes, path: Path) -> list[int]:
    if len(header) < 4 or header[:2] != b"\0\0" or header[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = header[3]
    return [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or .gz) as a uint8 array."""
    with _open_idx(path) as f:
        data = f.read()
    shape = idx_shape(data, path)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * len(shape)).reshape(shape)


def idx_length(path: Path) -> int:
    """Number of items in an IDX file, from its header alone."""
    with _open_idx(path) as f:
        return idx_shape(f.read(8), path)[0]


def find_idx(source_dir: Path, stem: str) -> Path:
    for candidate in (source_dir / f"{stem}.gz", source_dir / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {source_dir}. Install it with "
        "'apt-get install dataset-fashion-mnist', or download the four idx files and set paths.fashion_mnist_dir"
    )


@dataclass(frozen=True)
class FashionMNISTShards:
    """One split of Fashion-MNIST as captioned shards; ``ensure()`` writes them if the cache lacks them.

    Each sample: ``png`` (28×28 grayscale), ``txt`` (caption), ``cls`` (true class id) and ``json`` with the true
    class, the captioned class (-1 for a generic caption), whether the caption is wrong (``corrupted``) and, for a
    swapped one, the index of the image it was taken from. A fraction ``noise`` of the train captions is wrong, of
    kind ``noise_kind``: ``flip`` names a uniformly chosen other class, ``swap`` is the caption of a random training
    image of another class, ``generic`` is uninformative text ("new arrival", "IMG_0042", …). Validation and test
    captions are always clean and the json lists several of them (positives for retrieval). With ``shift`` (val or
    test only) each image is under one seeded corruption of those named (``psdclip.data.shift``), named in its json:
    a shifted evaluation split.
    """

    split: str
    source_dir: str
    cache_dir: str
    noise: float = 0.0
    noise_kind: str = "flip"
    seed: int = 0
    shard_size: int = 5000
    size: int | None = None  # the first ``size`` images of the split (None: all)
    shift: tuple[str, ...] | None = None  # image corruptions, for a shifted evaluation split

    # what a subclass writing another dataset from the same idx files changes: its cache folder and noise kinds
    cache_folder: ClassVar[str] = "fashion_mnist"
    noise_kinds: ClassVar[tuple[str, ...]] = NOISE_KINDS

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"unknown Fashion-MNIST split {self.split!r}; choose one of {SPLITS}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"data.noise must be a fraction in [0, 1], got {self.noise}")
        if self.noise_kind not in self.noise_kinds:
            raise ValueError(f"unknown data.noise_kind {self.noise_kind!r}; choose one of {self.noise_kinds}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"data.train_size must be a positive number of images or null (all), got {self.size}")
        if self.shift is not None:
            if self.split == "train":
                raise ValueError("image corruptions (shift) make a shifted evaluation split: use them on val or test")
            check_corruptions(self.shift)
        # at construction, so a run that evaluates on it fails at start-up, not after training
        self.source_files()

    @property
    def noisy(self) -> bool:
        return self.split == "train" and self.noise > 0

    def cache_settings(self) -> dict:
        """Every setting that shapes the shards; the cache folder's name carries their hash."""
        sources = [f"{path.name}:{path.stat().st_size}" for path in self.source_files()]
        return {
            "split": self.split,
            "noise": self.noise if self.noisy else 0.0,
            "noise_kind": self.noise_kind if self.noisy else None,
            "seed": self.seed,
            "shard_size": self.shard_size,
            "rows": list(self.rows),
            "sources": sources,
            "templates": CAPTION_TEMPLATES,
            "generic": GENERIC_CAPTIONS,
            "classnames": CLASSNAMES,
            "version": FORMAT_VERSION,
            **({"shift": list(self.shift)} if self.shift else {}),
        }

    @cached_property
    def directory(self) -> Path:
        noise = self.noise if self.noisy else 0.0
        digest = hashlib.sha1(json.dumps(self.cache_settings(), sort_keys=True).encode()).hexdigest()[:10]
        kind = f"-{self.noise_kind}" if self.noisy else ""
        split = f"{self.split}-shifted" if self.shift else self.split
        return Path(self.cache_dir) / self.cache_folder / f"{split}-noise{noise:g}{kind}-n{self.num_samples}-{digest}"

    def source_files(self) -> tuple[Path, Path]:
        images, labels = IDX_FILES["test" if self.split == "test" else "train"]
        return find_idx(Path(self.source_dir), images), find_idx(Path(self.source_dir), labels)

    @cached_property
    def split_rows(self) -> range:
        """All of the split's rows of its idx file."""
        total = idx_length(self.source_files()[1])
        held_out = math.floor(total * VAL_FRACTION) if self.split != "test" else 0
        return range(total - held_out, total) if self.split == "val" else range(total - held_out)

    @cached_property
    def rows(self) -> range:
        """The rows the samples are made of: the split's first ``size``."""
        if self.size is not None and self.size > len(self.split_rows):
            raise ValueError(
                f"data.train_size={self.size} is more than the {len(self.split_rows)} images of the {self.split} split"
            )
        return self.split_rows[: self.size]

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_size)

    @property
    def pattern(self) -> str:
        return str(self.directory / f"{self.split}-{{000000..{self.num_shards - 1:06d}}}.tar")

    def ensure(self) -> Path:
        manifest = self.directory / "manifest.json"
        if manifest.is_file():
            return self.directory
        images_file, labels_file = self.source_files()
        images, labels = read_idx(images_file), read_idx(labels_file)
        if len(images) != len(labels) or images.ndim != 3:
            raise ValueError(
                f"{images_file} and {labels_file} hold {images.shape} images and {len(labels)} labels; "
                "expected N×H×W images with N labels"
            )
        if labels.max() >= len(CLASSNAMES):
            raise ValueError(
                f"{labels_file} has label {labels.max()}, but there are only {len(CLASSNAMES)} class names"
            )
        log.info(
            "writing %s %s shards (%d samples) to %s", self.cache_folder, self.split, self.num_samples, self.directory
        )
        progress = Progress(log, f"{self.cache_folder} {self.split} shards", self.num_samples)
        # built in a private folder and renamed into place: concurrent writers (DDP ranks, sweep jobs) never mix,
        # and the first to finish wins
        staging = self.directory.with_name(f".{self.directory.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        rows = np.asarray(self.rows)
        images, labels = images[rows], labels[rows]
        if self.shift:
            images, corruptions = corrupt(images, self.shift, self.seed)
            samples = with_corruptions(self._samples(images, labels), corruptions)
        else:
            samples = self._samples(images, labels)
        samples = progress.track(samples)
        sizes = write_shards(samples, staging, prefix=f"{self.split}-", shard_size=self.shard_size)
        (staging / "manifest.json").write_text(
            json.dumps({**asdict(self), "directory": str(self.directory), "shards": sizes}, indent=1)
        )
        try:
            staging.rename(self.directory)
        except OSError:
            if not manifest.is_file():
                raise
            shutil.rmtree(staging)
        return self.directory

    def _samples(self, images: np.ndarray, labels: np.ndarray):
        rng = np.random.default_rng(self.seed)
        corrupted = rng.random(len(labels)) < (self.noise if self.noisy else 0.0)
        # the clean captions first, so a swapped caption is another image's own caption
        templates = np.stack(
            [rng.choice(len(CAPTION_TEMPLATES), TEST_CAPTIONS_PER_IMAGE, replace=False) for _ in labels]
        )
        captions = [
            [CAPTION_TEMPLATES[t].format(c=CLASSNAMES[label]) for t in row] for label, row in zip(labels, templates)
        ]
        caption_labels, donors = labels.astype(np.int64), np.full(len(labels), -1)
        wrong = np.flatnonzero(corrupted)
        if self.noise_kind == "flip":
            caption_labels[wrong] = (labels[wrong] + rng.integers(1, len(CLASSNAMES), len(wrong))) % len(CLASSNAMES)
            for index in wrong:
                captions[index][0] = CAPTION_TEMPLATES[templates[index, 0]].format(c=CLASSNAMES[caption_labels[index]])
        elif self.noise_kind == "swap":
            clean = [row[0] for row in captions]
            for label in np.unique(labels[wrong]):  # donors of another class, so every swapped caption is wrong
                takers, others = wrong[labels[wrong] == label], np.flatnonzero(labels != label)
                donors[takers] = others[rng.integers(len(others), size=len(takers))]
            caption_labels[wrong] = labels[donors[wrong]]
            for index in wrong:
                captions[index][0] = clean[donors[index]]
        else:
            caption_labels[wrong] = -1
            for index in wrong:
                captions[index][0] = GENERIC_CAPTIONS[rng.integers(len(GENERIC_CAPTIONS))]
        for index, (image, label) in enumerate(zip(images, labels)):
            meta = {
                "label": int(label),
                "caption_label": int(caption_labels[index]),
                "corrupted": bool(corrupted[index]),
            }
            if self.noise_kind == "swap" and corrupted[index]:
                meta["swapped_from"] = int(donors[index])
            if self.split != "train":
                meta["captions"] = captions[index]
            yield {
                "__key__": f"{index:06d}",
                "png": encode_image(Image.fromarray(image, mode="L")),
                "txt": captions[index][0],
                "cls": str(int(label)),
                "json": json.dumps(meta),
            }


def with_corruptions(samples: Iterator[dict], corruptions: list[str]) -> Iterator[dict]:
    """The samples, each json naming the corruption its image is under."""
    for sample, corruption in zip(samples, corruptions, strict=True):
        yield {**sample, "json": json.dumps({**json.loads(sample["json"]), "corruption": corruption})}


class EmbeddedDataModule(ShardDataModule):
    """Fashion-MNIST train shards with ``noise`` of the captions wrong (of ``noise_kind``), streamed like any shards.

    ``train_size`` trains on the first images only (a fixed set, read once per epoch): a small set over many epochs
    is the regime where caption noise is memorised, as in multi-epoch web-scale training. Settings and their
    defaults: ``conf/data/embedded.yaml`` (``embedded_mosaic.yaml`` for the mosaics); ``kwargs`` go to
    ``ShardDataModule``.
    """

    shards_class: ClassVar[type[FashionMNISTShards]] = FashionMNISTShards

    def __init__(
        self,
        *,
        source_dir: str,
        cache_dir: str,
        noise: float,
        noise_kind: str,
        train_size: int | None,
        shard_size: int,
        seed: int,
        **kwargs,
    ):
        self.shards = self.shards_class(
            "train",
            source_dir,
            cache_dir,
            noise=noise,
            noise_kind=noise_kind,
            seed=seed,
            shard_size=shard_size,
            size=train_size,
        )
        super().__init__(train_shards=self.shards.pattern, seed=seed, **kwargs)
        self.noise, self.noise_kind = noise, noise_kind

    def prepare_data(self):
        self.shards.ensure()
