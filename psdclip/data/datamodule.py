"""LightningDataModule streaming image–caption webdataset shards."""

import logging
from collections.abc import Callable
from functools import cached_property

import lightning as L
import torch

from psdclip.data.pipeline import EpochLoader, ShardStream
from psdclip.data.plan import batches_per_rank
from psdclip.data.samples import COUNTERS, Retries, SkipWarnings
from psdclip.data.sources import Shard, ShardSource, parse_sources, resolve
from psdclip.run.cli import check_setting
from psdclip.run.tables import read_flagged

log = logging.getLogger(__name__)


class ShardDataModule(L.LightningDataModule):
    """Training stream over image–caption tar shards in img2dataset's layout (``{key}.jpg``, ``{key}.txt``, ``{key}.json``).

    Args:
        train_shards: a brace pattern, folder, glob or URL (``pipe:…``, ``https://…``, ``s3://…``), a list of them,
            or a mixture ``{name: {urls, upsample, num_samples}}``.
        train_num_samples: samples per epoch; by default all the shards hold (× upsample), read from their size files.
        batch_size: per-device batch size; every rank gets ``batches_per_epoch(world_size)`` full batches per epoch.
        resampled: draw shards with replacement (epochs become ``train_num_samples`` draws; needed for fractional
            upsample factors).
        num_workers: DataLoader workers per rank; shuffle_buffer: samples in the shuffle buffer.
        image_key: image extensions to try in order; text_key: ``txt`` or ``json:<field>``.
        threshold_pairs: share of pairs given another pair's caption on purpose (``pipeline.PairIds``);
            threshold_pairs_cap: about how many at most (null: no cap).
        exclude_keys: a CSV with ``shard`` and ``key`` columns (the audit's ``memory.csv`` or ``scores.csv``; where
            it has a ``flagged`` column, its flagged rows) whose pairs training leaves out; the epoch shrinks by as
            many pairs, and each is counted in ``data/skipped/excluded``.
        shard_retries, retry_wait_s: a remote shard that fails to open is tried again ``shard_retries`` times, after
            ``retry_wait_s``, 2 × ``retry_wait_s``, … seconds; then it is skipped for the epoch, counted
            (``shard_unreadable``) and named once, and other samples fill its place.
        transform, tokenizer: set by ``train.py`` from the model (open_clip's train preprocessing and tokenizer).

    ``conf/data/shards.yaml`` holds the settings' defaults; the few kept here, for direct use in tests and
    benchmarks, equal it (``tests/test_defaults.py``).

    Skipped samples are counted by kind in ``skipped`` (this rank, since the start); ``DataQualityMonitor`` logs them.
    The first skip of each kind in each shard is warned about once per run, naming the shard.

    The stream position is part of the checkpoint (``state_dict``: the epoch and the batches trained on in it): after
    a mid-epoch resume the restarted epoch's stream passes over those batches, so the run sees the same batches as an
    uninterrupted one.
    """

    def __init__(
        self,
        train_shards,
        *,
        batch_size: int,
        num_workers: int,
        shuffle_buffer: int,
        train_num_samples: int | None = None,
        resampled: bool = False,
        image_key: str = "jpg;jpeg;png;webp",
        text_key: str = "txt",
        threshold_pairs: float = 0.0,
        threshold_pairs_cap: int | None = None,
        exclude_keys: str | None = None,
        seed: int = 0,
        shard_retries: int = 3,
        retry_wait_s: float = 1.0,
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
    ):
        super().__init__()
        check_setting("data.batch_size", batch_size)
        self.train_shards, self.train_num_samples, self.resampled = train_shards, train_num_samples, resampled
        self.batch_size, self.num_workers, self.shuffle_buffer = batch_size, num_workers, shuffle_buffer
        self.image_key, self.text_key, self.seed = image_key, text_key, seed
        self.threshold_pairs, self.threshold_pairs_cap = threshold_pairs, threshold_pairs_cap
        self.excluded = read_excluded(exclude_keys) if exclude_keys else frozenset()
        self.retries = Retries(shard_retries, retry_wait_s)
        self.transform, self.tokenizer = transform, tokenizer
        self.skipped = torch.zeros(len(COUNTERS), dtype=torch.int64)
        self.skip_warnings = SkipWarnings()
        self.batches_done = 0  # the training stream's position in the trainer's current epoch: batches trained on
        self.resume_position: dict[str, int] | None = None  # the position a checkpoint restored, until used

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.trainer.current_epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.resume_position = dict(state_dict)

    def start_epoch(self, epoch: int) -> int:
        """The training stream of ``epoch`` begins: how many of its batches a restored checkpoint already trained on."""
        position, self.resume_position = self.resume_position, None
        done = position["batches_done"] if position and position["epoch"] == epoch else 0
        done = done if done < self.batches_per_epoch(self.trainer.world_size if self.trainer else 1) else 0
        if done:
            log.info("resuming mid-epoch %d: skipping the %d batches already trained on", epoch, done)
        self.batches_done = done
        return done

    @cached_property
    def sources(self) -> list[ShardSource]:
        sources = parse_sources(self.train_shards)
        if len(sources) == 1 and sources[0].num_samples is None and self.train_num_samples:
            # a single source's epoch size doubles as its size where no size file lists the shards
            sources = [ShardSource(sources[0].urls, sources[0].upsample, self.train_num_samples, sources[0].name)]
        if not any(source.upsample > 0 for source in sources):
            raise ValueError("every source has upsample 0; nothing to train on")
        return sources

    @cached_property
    def resolved_shards(self) -> list[Shard]:
        """Every present shard with its size; missing local shards are warned about (and counted by ``stream``)."""
        shards, self.missing_shards = resolve(self.sources)
        return shards

    def num_samples(self) -> int:
        if self.train_num_samples:
            return self.train_num_samples - len(self.excluded)
        upsample = [source.upsample for source in self.sources]
        return round(sum(shard.size * upsample[shard.source] for shard in self.resolved_shards)) - len(self.excluded)

    def batches_per_epoch(self, world_size: int = 1) -> int:
        """Full batches each rank yields per epoch (the last ``num_samples mod (world_size·batch_size)`` wait)."""
        batches = batches_per_rank(self.num_samples(), self.batch_size, world_size)
        if batches < 1:
            raise ValueError(
                f"an epoch of {self.num_samples()} samples gives no full batch of {self.batch_size} "
                f"on each of {world_size} rank(s); lower data.batch_size"
            )
        return batches

    def stream(self, rank: int = 0, world_size: int = 1, epoch: int = 0) -> ShardStream:
        """The training stream of one rank (what ``train_dataloader`` wraps; handy in tests and benchmarks)."""
        if self.transform is None or self.tokenizer is None:
            raise RuntimeError("ShardDataModule needs the model's transform and tokenizer before streaming")
        self.batches_per_epoch(world_size)  # clear errors before any worker starts
        shards = self.resolved_shards
        # shards missing at start-up count once over all ranks (the monitor sums ranks); later ones add to this
        self.skipped[COUNTERS.index("shard_missing")] = len(self.missing_shards) if rank == 0 else 0
        return ShardStream(
            shards,
            self.transform,
            self.tokenizer,
            self.batch_size,
            self.num_samples(),
            upsample=[source.upsample for source in self.sources],
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            epoch=epoch,
            shuffle_buffer=self.shuffle_buffer,
            resampled=self.resampled,
            image_key=self.image_key,
            text_key=self.text_key,
            threshold_pairs=self.threshold_pairs,
            threshold_pairs_cap=self.threshold_pairs_cap,
            excluded=self.excluded,
            retries=self.retries,
        )

    def pair_space(self) -> int | None:
        """How many pairs the shards hold when pairs have dense identities (every shard's size listed), else None
        (``psdclip.data.pipeline.PairIds``): what a per-pair memory is sized by."""
        shards = self.resolved_shards
        return sum(shard.size for shard in shards) if all(shard.listed for shard in shards) else None

    def train_dataloader(self) -> EpochLoader:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return EpochLoader(
            self.stream(rank, world_size),
            current_epoch=(lambda: trainer.current_epoch) if trainer else None,
            batches_to_skip=self.start_epoch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Keep the skip counts the batch carries and warn about new bad shards; the model gets images, tokens and
        ``psdclip.module.PairInfo``'s fields (noise marks, pair ids, threshold-pair flags)."""
        if len(batch) == 6:  # a training batch, about to be trained on
            images, tokens, skips, marks, ids, planted = batch
            self.batches_done += 1
            self.skipped += skips.counts
            self.skip_warnings.warn(skips.notes)
            return images, tokens, marks, ids, planted
        return batch


def read_excluded(path: str) -> frozenset[tuple[str, str]]:
    """The (shard, key) pairs of ``path`` (a CSV with ``shard`` and ``key`` columns; only the flagged rows where it
    has a ``flagged`` column)."""
    table = read_flagged(path, "data.exclude_keys", ["shard", "key"])
    log.info("leaving out the %d pairs listed in %s", len(table), path)
    return frozenset(zip(table["shard"], table["key"], strict=True))
