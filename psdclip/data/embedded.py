"""The embedded default dataset: Fashion-MNIST written as captioned webdataset shards, with caption noise.

Shards land in a cache folder named by a hash of every setting that shapes them, so a changed setting
builds a new folder and an unchanged one is reused.
"""

import gzip
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from psdclip.data.datamodule import ShardDataModule
from psdclip.data.writer import encode_image, write_shards

log = logging.getLogger(__name__)

RESOURCES = Path(__file__).parent / "fashion_mnist"
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FORMAT_VERSION = 1  # bump when the shard contents change for the same settings
TEST_CAPTIONS_PER_IMAGE = 5


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


CLASSNAMES = read_lines(RESOURCES / "classnames.txt")
CAPTION_TEMPLATES = read_lines(RESOURCES / "caption_templates.txt")


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

    Each sample: ``png`` (28×28 grayscale), ``txt`` (caption), ``cls`` (true class id) and ``json`` with the
    true class, the captioned class and whether the caption was corrupted. Test captions are always clean and
    the json lists several of them (positives for retrieval).
    """

    split: str
    source_dir: str
    cache_dir: str
    noise: float = 0.0
    seed: int = 0
    shard_size: int = 5000

    def __post_init__(self):
        if self.split not in IDX_FILES:
            raise ValueError(f"unknown Fashion-MNIST split {self.split!r}; choose 'train' or 'test'")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"data.noise must be a fraction in [0, 1], got {self.noise}")
        # at construction, so a run that evaluates on it fails at start-up, not after training
        self.source_files()

    @cached_property
    def directory(self) -> Path:
        noise = self.noise if self.split == "train" else 0.0
        sources = [f"{path.name}:{path.stat().st_size}" for path in self.source_files()]
        settings = dict(split=self.split, noise=noise, seed=self.seed, shard_size=self.shard_size, sources=sources,
                        templates=CAPTION_TEMPLATES, classnames=CLASSNAMES, version=FORMAT_VERSION)
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        return Path(self.cache_dir) / "fashion_mnist" / f"{self.split}-noise{noise:g}-{digest}"

    def source_files(self) -> tuple[Path, Path]:
        images, labels = IDX_FILES[self.split]
        return find_idx(Path(self.source_dir), images), find_idx(Path(self.source_dir), labels)

    @cached_property
    def num_samples(self) -> int:
        return idx_length(self.source_files()[1])

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
            raise ValueError(f"{images_file} and {labels_file} hold {images.shape} images and {len(labels)} labels; "
                             "expected N×H×W images with N labels")
        if labels.max() >= len(CLASSNAMES):
            raise ValueError(f"{labels_file} has label {labels.max()}, but there are only {len(CLASSNAMES)} class names")
        log.info("writing Fashion-MNIST %s shards to %s", self.split, self.directory)
        # built in a private folder and renamed into place: concurrent writers (DDP ranks, sweep jobs) never mix,
        # and the first to finish wins
        staging = self.directory.with_name(f".{self.directory.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        sizes = write_shards(self._samples(images, labels), staging, prefix=f"{self.split}-", shard_size=self.shard_size)
        (staging / "manifest.json").write_text(json.dumps({**asdict(self), "directory": str(self.directory), "shards": sizes}, indent=1))
        try:
            staging.rename(self.directory)
        except OSError:
            if not manifest.is_file():
                raise
            shutil.rmtree(staging)
        return self.directory

    def _samples(self, images: np.ndarray, labels: np.ndarray):
        rng = np.random.default_rng(self.seed)
        corrupted = rng.random(len(labels)) < (self.noise if self.split == "train" else 0.0)
        # a corrupted caption names a uniformly chosen *different* class
        caption_labels = np.where(corrupted, (labels + rng.integers(1, len(CLASSNAMES), len(labels))) % len(CLASSNAMES), labels)
        for index, (image, label, caption_label) in enumerate(zip(images, labels, caption_labels)):
            templates = rng.choice(len(CAPTION_TEMPLATES), TEST_CAPTIONS_PER_IMAGE, replace=False)
            captions = [CAPTION_TEMPLATES[t].format(c=CLASSNAMES[caption_label]) for t in templates]
            meta = {"label": int(label), "caption_label": int(caption_label), "corrupted": bool(corrupted[index])}
            if self.split == "test":
                meta["captions"] = captions
            yield {
                "__key__": f"{index:06d}",
                "png": encode_image(Image.fromarray(image, mode="L")),
                "txt": captions[0],
                "cls": str(int(label)),
                "json": json.dumps(meta),
            }


class EmbeddedDataModule(ShardDataModule):
    """Fashion-MNIST shards with ``noise`` of the training captions naming a wrong class, streamed like any shards."""

    def __init__(self, source_dir: str, cache_dir: str, noise: float = 0.3, shard_size: int = 5000, seed: int = 0, **kwargs):
        self.shards = FashionMNISTShards("train", source_dir, cache_dir, noise=noise, seed=seed, shard_size=shard_size)
        super().__init__(train_shards=self.shards.pattern, seed=seed, **kwargs)
        self.noise = noise

    def prepare_data(self):
        self.shards.ensure()
