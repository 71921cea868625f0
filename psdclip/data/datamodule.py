"""LightningDataModule streaming image–caption webdataset shards."""

import math
from collections.abc import Callable

import lightning as L
from torch.utils.data import DataLoader

from psdclip.data.pipeline import count_samples, expand_shards, image_text_pipeline


class ShardDataModule(L.LightningDataModule):
    """Training stream over image–caption tar shards (img2dataset layout: ``{key}.jpg``, ``{key}.txt``).

    Args:
        train_shards: brace pattern(s) of the training shards.
        train_num_samples: samples per epoch; read from ``sizes.json`` beside local shards when omitted.
        batch_size: per-device batch size; every rank gets the same number of full batches per epoch.
        transform, tokenizer: set by ``train.py`` from the model (open_clip's train preprocessing and tokenizer).
    """

    def __init__(
        self,
        train_shards: str | list[str],
        train_num_samples: int | None = None,
        batch_size: int = 256,
        num_workers: int = 2,
        shuffle_buffer: int = 2000,
        image_key: str = "jpg;jpeg;png;webp",
        text_key: str = "txt",
        seed: int = 0,
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
    ):
        super().__init__()
        self.train_shards, self.train_num_samples = train_shards, train_num_samples
        self.batch_size, self.num_workers, self.shuffle_buffer = batch_size, num_workers, shuffle_buffer
        self.image_key, self.text_key, self.seed = image_key, text_key, seed
        self.transform, self.tokenizer = transform, tokenizer

    def num_samples(self) -> int:
        shards = expand_shards(self.train_shards)
        count = self.train_num_samples or count_samples(shards)
        if not count:
            raise ValueError(
                f"cannot tell the epoch size of {self.train_shards!r}: no sizes.json lists these shards; "
                "set data.train_num_samples"
            )
        return count

    def batches_per_epoch(self, world_size: int = 1) -> int:
        """Full batches each rank yields per epoch, a multiple of the worker count so workers share it evenly."""
        workers = max(self.num_workers, 1)
        per_rank = self.num_samples() // (self.batch_size * world_size)
        if per_rank < workers:
            raise ValueError(
                f"{self.num_samples()} samples give {per_rank} batches of {self.batch_size} per rank on "
                f"{world_size} rank(s), fewer than the {workers} data workers"
            )
        return per_rank // workers * workers

    def train_dataloader(self) -> DataLoader:
        if self.transform is None or self.tokenizer is None:
            raise RuntimeError("ShardDataModule needs the model's transform and tokenizer before streaming")
        trainer = self.trainer
        world_size = trainer.world_size if trainer else 1
        batches = self.batches_per_epoch(world_size)
        pipeline = image_text_pipeline(
            expand_shards(self.train_shards),
            self.transform,
            self.tokenizer,
            self.batch_size,
            image_key=self.image_key,
            text_key=self.text_key,
            shuffle=True,
            seed=self.seed,
            start_epoch=trainer.current_epoch if trainer else 0,
            shuffle_buffer=self.shuffle_buffer,
            drop_last=True,
        )
        pipeline = pipeline.with_epoch(math.ceil(batches / max(self.num_workers, 1))).with_length(batches)
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=True,
        )
