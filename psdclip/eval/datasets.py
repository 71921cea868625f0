"""Evaluation sets: CLIP_benchmark's webdataset layout, plain image folders, the embedded Fashion-MNIST and its mosaics.

Every set streams batches of ``(images, labels, captions)`` for a split (``captions``: one list per image, empty
where there are none; ``labels``: -1 where there are none), restricted to one rank's share under DDP, and says
which tasks it supports.
"""

import logging
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import torch
import webdataset as wds
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from psdclip.data.samples import shard_samples
from psdclip.data.sources import expand_shards, read_lines

log = logging.getLogger(__name__)

RESOURCES = Path(__file__).parent / "resources"
IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")
Batch = tuple[torch.Tensor, torch.Tensor, list[list[str]]]


def resolve_file(name: str | Path | None, default: Path) -> Path:
    """``name`` as given, or a file shipped in ``psdclip/eval/resources`` when ``name`` is a bare file name found there."""
    if name is None:
        return default
    path = Path(name)
    if not path.exists() and path.name == str(name) and (RESOURCES / path).is_file():
        return RESOURCES / path
    return path


def read_tars(sources: Iterable[dict]) -> Iterator[dict]:
    """webdataset stage: each shard's samples, read as training reads them (``shard_samples``); a shard that cannot
    be read whole stops the evaluation, naming it (a set with a hole would report wrong numbers)."""
    for source in sources:
        yield from shard_samples(source["url"], 0, sys.maxsize, unreadable)


def unreadable(kind: str, url: str, detail: str = "", count: int = 1) -> NoReturn:
    error = sys.exc_info()[1]  # the read error shard_samples is handling, raised again with the shard's name
    raise type(error)(f"{error} (evaluation shard {url}: {kind})") from error


def collate(samples: list[tuple]) -> Batch:
    images, labels, captions = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), list(captions)


class EvalSet:
    """What every evaluation set offers; subclasses implement ``batches`` and say which splits exist."""

    root: Path
    classnames_file: Path | None = None
    templates_file: Path | None = None
    retrieval = False

    @property
    def classnames(self) -> list[str]:
        return read_lines(self.classnames_file)

    @property
    def templates(self) -> list[str]:
        return read_lines(self.templates_file)

    def has_split(self, split: str) -> bool:
        raise NotImplementedError

    @property
    def tasks(self) -> set[str]:
        if self.retrieval:
            return {"retrieval"}
        tasks = {"zeroshot"} if self.templates_file and self.templates_file.is_file() else set()
        return tasks | ({"linear_probe"} if self.has_split("train") else set())

    def batches(
        self, split: str, transform: Callable, batch_size: int, num_workers: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterable[Batch]:
        raise NotImplementedError


class WdsEvalSet(EvalSet):
    """A folder in CLIP_benchmark's webdataset layout::

    root/{test,train}/*.tar   samples: an image (webp/png/jpg/jpeg) and ``cls``, or for retrieval ``txt``
                              with one caption per line
    root/classnames.txt, root/zeroshot_classification_templates.txt (templates use ``{c}``)
    root/dataset_type.txt     "retrieval" for image–text sets (or set ``retrieval``)
    """

    def __init__(
        self,
        root: str,
        classnames_file: str | None = None,
        templates_file: str | None = None,
        retrieval: bool | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"evaluation dataset folder not found: {self.root}; prepare it under paths.eval_root as "
                "docs/evaluation_datasets.md describes, or leave the set out: evaluation/datasets=[…] lists the sets "
                "to keep (~callbacks.evaluation evaluates nothing)"
            )
        self.classnames_file = resolve_file(classnames_file, self.root / "classnames.txt")
        self.templates_file = resolve_file(templates_file, self.root / "zeroshot_classification_templates.txt")
        type_file = self.root / "dataset_type.txt"
        self.retrieval = (
            retrieval
            if retrieval is not None
            else type_file.is_file() and type_file.read_text().strip().lower() == "retrieval"
        )

    def has_split(self, split: str) -> bool:
        return (self.root / split).is_dir()

    def shards(self, split: str) -> list[str]:
        folder = self.root / split
        shards = sorted(folder.glob("*.tar"), key=lambda p: (len(p.stem), p.stem)) if folder.is_dir() else []
        if not shards:
            raise FileNotFoundError(f"no {split} shards (*.tar) in {folder}")
        return [str(shard) for shard in shards]

    def _sample(self, transform: Callable) -> Callable:
        def convert(sample: dict) -> tuple:
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            if key is None:
                raise ValueError(
                    f"sample {sample['__key__']} in {sample['__url__']} has no image ({'/'.join(IMAGE_KEYS)})"
                )
            captions = sample.get("txt", "").splitlines() if self.retrieval else []
            return transform(sample[key]), int(sample.get("cls", -1)), [c for c in captions if c.strip()]

        return convert

    def pipeline(
        self,
        shards: list[str],
        transform: Callable,
        batch_size: int,
        rank: int,
        world_size: int,
        keep: Callable | None = None,
    ) -> wds.DataPipeline:
        stages = [
            wds.SimpleShardList(shards[rank::world_size] if len(shards) >= world_size else shards),
            wds.split_by_worker,
            read_tars,
        ]
        if len(shards) < world_size:  # too few shards to give each rank its own: split samples instead
            stages.append(
                wds.select(lambda s: zlib.crc32(f"{s['__url__']}/{s['__key__']}".encode()) % world_size == rank)
            )
        if keep is not None:
            stages.append(wds.select(keep))
        stages += [
            wds.decode("pilrgb"),
            wds.map(self._sample(transform)),
            wds.batched(batch_size, collation_fn=collate, partial=True),
        ]
        return wds.DataPipeline(*stages)

    def batches(self, split, transform, batch_size, num_workers=0, rank=0, world_size=1):
        pipeline = self.pipeline(self.shards(split), transform, batch_size, rank, world_size)
        return DataLoader(pipeline, batch_size=None, num_workers=num_workers)


class ImageFolderEvalSet(EvalSet):
    """Plain image folders, ``root/[split/]class_name/*.jpg`` (torchvision's ImageFolder; classes in sorted order).

    The test split is ``root/test`` when it exists, else ``root`` itself; ``root/train`` enables the linear probe.
    Class names default to the folder names with underscores as spaces.
    """

    def __init__(self, root: str, templates_file: str | None = None, classnames_file: str | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"evaluation dataset folder not found: {self.root}; prepare it under paths.eval_root as "
                "docs/evaluation_datasets.md describes, or leave the set out: evaluation/datasets=[…] lists the sets "
                "to keep (~callbacks.evaluation evaluates nothing)"
            )
        self.templates_file = resolve_file(templates_file, self.root / "zeroshot_classification_templates.txt")
        self.classnames_file = resolve_file(classnames_file, self.root / "classnames.txt") if classnames_file else None

    def folder(self, split: str) -> Path:
        return self.root / split if (self.root / split).is_dir() or split != "test" else self.root

    def has_split(self, split: str) -> bool:
        return self.folder(split).is_dir()

    @property
    def classnames(self) -> list[str]:
        folders = sorted(entry.name for entry in self.folder("test").iterdir() if entry.is_dir())
        if self.classnames_file is None:
            return [name.replace("_", " ") for name in folders]
        names = read_lines(self.classnames_file)
        if len(names) != len(folders):
            raise ValueError(
                f"{self.classnames_file} lists {len(names)} class names but {self.folder('test')} has {len(folders)} class folders"
            )
        return names

    def batches(self, split, transform, batch_size, num_workers=0, rank=0, world_size=1):
        dataset = ImageFolder(str(self.folder(split)), transform=transform)
        share = Subset(dataset, range(rank, len(dataset), world_size))
        return DataLoader(
            share,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=lambda s: collate([(x, y, []) for x, y in s]),
        )


class FashionMNISTEvalSet(WdsEvalSet):
    """The embedded Fashion-MNIST, from cached shards (written on first use).

    ``split`` (``test``, or ``val``: the held-out training images, for choosing settings without touching the test
    set) serves zero-shot, the linear probe's test and retrieval (its first ``retrieval_images`` images, each with
    the several clean captions written for it as positives — Flickr30k's test size by default). The linear probe
    trains on the first ``train_samples`` images of the train split with their true labels. ``shift`` names image
    corruptions (``psdclip.data.shift``) that the split's images are under, one each: a shifted set for effective
    robustness; the probe still trains on clean images.
    """

    def __init__(
        self,
        source_dir: str,
        cache_dir: str,
        split: str = "test",
        train_samples: int = 5000,
        retrieval_images: int = 1000,
        shift: Sequence[str] | None = None,
    ):
        from psdclip.data.embedded import RESOURCES as DATA_RESOURCES
        from psdclip.data.embedded import FashionMNISTShards

        if split not in ("test", "val"):
            raise ValueError(f"the embedded evaluation split must be 'test' or 'val', got {split!r}")
        probe = FashionMNISTShards("train", source_dir, cache_dir)
        if train_samples < probe.num_samples:
            probe = FashionMNISTShards("train", source_dir, cache_dir, size=train_samples)
        shifted = tuple(shift) if shift else None
        self.splits = {"test": FashionMNISTShards(split, source_dir, cache_dir, shift=shifted), "train": probe}
        self.root = Path(source_dir)
        self.classnames_file = DATA_RESOURCES / "classnames.txt"
        self.templates_file = DATA_RESOURCES / "zeroshot_classification_templates.txt"
        self.retrieval_images = retrieval_images

    @property
    def tasks(self) -> set[str]:
        return {"zeroshot", "linear_probe", "retrieval"}

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def _sample(self, transform: Callable) -> Callable:
        def convert(sample: dict) -> tuple:
            captions = sample["json"].get("captions", []) if int(sample["__key__"]) < self.retrieval_images else []
            return transform(sample["png"]), int(sample["cls"]), captions

        return convert

    def batches(self, split, transform, batch_size, num_workers=0, rank=0, world_size=1):
        shards = self.splits[split]
        shards.ensure()
        pipeline = self.pipeline(expand_shards(shards.pattern), transform, batch_size, rank, world_size)
        return DataLoader(pipeline, batch_size=None, num_workers=num_workers)


class FashionMosaicEvalSet(FashionMNISTEvalSet):
    """The embedded mosaics (``data=embedded_mosaic``), from cached shards (written on first use).

    ``split`` (``test``, or ``val``: mosaics of the held-out training images) serves retrieval over its first
    ``retrieval_images`` mosaics, each with its several clean captions as positives, and zero-shot classification of
    every mosaic's top-left item, with prompts that say where the item is (``mosaic_zeroshot_templates.txt``): a
    model that learnt which classes a mosaic holds but not where reaches about 1/4 top-1, one that learnt neither 1/10.
    """

    def __init__(
        self,
        source_dir: str,
        cache_dir: str,
        split: str = "test",
        mosaics: int | None = None,
        retrieval_images: int = 1000,
    ):
        from psdclip.data.embedded import RESOURCES as DATA_RESOURCES
        from psdclip.data.mosaic import MosaicShards

        if split not in ("test", "val"):
            raise ValueError(f"the mosaic evaluation split must be 'test' or 'val', got {split!r}")
        self.splits = {"test": MosaicShards(split, source_dir, cache_dir, size=mosaics)}
        self.root = Path(source_dir)
        self.classnames_file = DATA_RESOURCES / "classnames.txt"
        self.templates_file = DATA_RESOURCES / "mosaic_zeroshot_templates.txt"
        self.retrieval_images = retrieval_images

    @property
    def tasks(self) -> set[str]:
        return {"zeroshot", "retrieval"}
