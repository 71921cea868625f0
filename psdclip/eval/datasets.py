"""Labelled evaluation sets in CLIP_benchmark's webdataset layout (``cls`` + image per sample)."""

from collections.abc import Callable
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from psdclip.data.sources import expand_shards


def read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class ClassificationSet:
    """Shards of (image, class id) with the class names and zero-shot templates that belong to them."""

    def __init__(self, name: str, shards: str, classnames_file: str, templates_file: str,
                 image_key: str = "jpg;jpeg;png;webp", label_key: str = "cls"):
        self.name, self.shards = name, shards
        self.classnames_file, self.templates_file = classnames_file, templates_file
        self.image_key, self.label_key = image_key, label_key

    @property
    def classnames(self) -> list[str]:
        return read_lines(self.classnames_file)

    @property
    def templates(self) -> list[str]:
        return read_lines(self.templates_file)

    def loader(self, transform: Callable, batch_size: int, num_workers: int = 0) -> DataLoader:
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(expand_shards(self.shards)),
            wds.split_by_worker,
            wds.tarfile_to_samples(),
            wds.decode("pilrgb"),
            wds.to_tuple(self.image_key, self.label_key),
            wds.map_tuple(transform, int),
            wds.batched(batch_size, partial=True),
        )
        return DataLoader(pipeline, batch_size=None, num_workers=num_workers)


class EmbeddedClassificationSet(ClassificationSet):
    """The Fashion-MNIST test split, written to the cache on first use."""

    def __init__(self, source_dir: str, cache_dir: str, name: str = "fashion_mnist"):
        from psdclip.data.embedded import RESOURCES, FashionMNISTShards

        self._split = FashionMNISTShards("test", source_dir, cache_dir)
        super().__init__(name, self._split.pattern, str(RESOURCES / "classnames.txt"),
                         str(RESOURCES / "zeroshot_classification_templates.txt"), image_key="png")

    def loader(self, transform: Callable, batch_size: int, num_workers: int = 0) -> DataLoader:
        self._split.ensure()
        return super().loader(transform, batch_size, num_workers)


@torch.no_grad()
def image_features(encode_image: Callable, loader: DataLoader, device) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image features and labels of a whole loader."""
    features, labels = [], []
    for images, targets in loader:
        features.append(torch.nn.functional.normalize(encode_image(images.to(device)).float(), dim=-1).cpu())
        labels.append(torch.as_tensor(targets))
    if not features:
        raise ValueError("evaluation split is empty")
    return torch.cat(features), torch.cat(labels)
