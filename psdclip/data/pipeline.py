"""The training stream: shards → samples → (images, tokens, skips, noise marks) batches, planned per rank and worker.

Each DataLoader worker reads its own stretch of the epoch (see ``plan``), shuffles samples through a buffer, decodes,
preprocesses and tokenises them, and yields batches of distinct samples that carry what it skipped since its last
batch (``samples.Skips``: counts, and notes for the warnings), so counting needs no state shared between processes. A sample whose ``json`` says whether its caption was corrupted
(the embedded data does) carries that mark (1 corrupted, 0 clean, -1 unknown), for the loss's diagnostics only.
"""

import hashlib
import itertools
import json
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from psdclip.data import plan
from psdclip.data.samples import (
    NO_RETRIES,
    BadSample,
    Retries,
    SkipCounter,
    Skips,
    caption_of,
    ignore,
    image_keys,
    image_of,
    read_segments,
    shard_samples,
)
from psdclip.data.sources import Shard

HASH_MASK = (1 << 63) - 1  # hashed identities are non-negative int64
# captions the threshold pairs take theirs from: the shards' first readable captions, the same pool in every worker,
# rank and epoch, so that a threshold pair is wrong in the same way every time it is seen, as a real wrong caption is
DONOR_POOL = 1024
# a stream that skips this many samples in a row is not web noise but wrong settings or unreadable data
MAX_CONSECUTIVE_SKIPS = 10_000


class Decoded(NamedTuple):
    image: torch.Tensor
    caption: str
    mark: int  # noise mark: 1 corrupted caption, 0 clean, -1 unknown
    key: tuple[str, str]  # (shard, sample key): what makes two samples the same
    refill: bool  # read in place of a skipped sample
    pair_id: int = 0  # the pair's identity (``PairIds``)
    planted: bool = False  # a threshold pair: given another pair's caption on purpose


class PairIds:
    """Each pair's identity, the same in every epoch and on every rank: a dense index (its shard's offset plus its
    place in the shard) where every shard's size is listed, else a 63-bit hash of (shard, key).

    A seeded ``threshold_share`` of the pairs, but about ``threshold_cap`` at most, are threshold pairs
    (``planted``): in training they are given another pair's caption on purpose, so that a subset rule can calibrate
    its cut-off on pairs known to be wrong (``psdclip.subsets.MemorySubset``). Which pairs, and which donor caption
    each takes, are drawn from the identity and the seed, never from the stream's order: a caption that changed every
    epoch could never be memorised, and would make the threshold pairs easier to tell than real wrong captions. The
    cap counts against the shards' pairs where their sizes are listed, else against ``pairs_hint`` (an epoch's
    samples): the calibration's error shrinks with the threshold pairs' count, while each costs what a wrong caption
    costs.
    """

    def __init__(
        self,
        urls: list[str],
        listed_sizes: list[int | None],
        seed: int,
        threshold_share: float,
        threshold_cap: int | None = None,
        pairs_hint: int | None = None,
    ):
        if not 0.0 <= threshold_share < 0.5:
            raise ValueError(f"data.threshold_pairs must be in [0, 0.5), got {threshold_share}")
        if threshold_cap is not None and threshold_cap < 1:
            raise ValueError(f"data.threshold_pairs_cap must be >= 1 or null, got {threshold_cap}")
        self.dense = all(size is not None for size in listed_sizes)
        offsets = itertools.accumulate((size or 0 for size in listed_sizes), initial=0)
        self.offsets = dict(zip(urls, offsets))
        self.pairs = sum(size or 0 for size in listed_sizes) if self.dense else None
        pairs = self.pairs or pairs_hint
        if threshold_cap is not None and pairs:
            threshold_share = min(threshold_share, threshold_cap / pairs)
        self.seed, self.threshold_share = seed, threshold_share

    def of(self, url: str, key: str, index: int) -> int:
        if self.dense:
            return self.offsets[url] + index
        digest = hashlib.blake2b(f"{url}\0{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & HASH_MASK

    def donor(self, pair_id: int, pool: int) -> int | None:
        """The place in a donor pool of ``pool`` captions of the caption a threshold pair takes; None: not one."""
        if not self.threshold_share or not pool:
            return None
        digest = hashlib.blake2b(f"{self.seed}\0{pair_id}".encode(), digest_size=16).digest()
        if int.from_bytes(digest[:8], "little") >= self.threshold_share * 2**64:
            return None
        return int.from_bytes(digest[8:], "little") % pool


def distinct_batches(items: Iterator[Decoded], batch_size: int) -> Iterator[list[Decoded]]:
    """Batches of ``batch_size`` items with distinct keys, in stream order; an item whose key the batch already holds
    waits for the next one (in contrastive learning a repeated pair is a false negative with identical content).
    The last batch is short when the items run out."""
    waiting: list[Decoded] = []
    # more held back than this: the stream repeats a handful of samples (resampling a set smaller than a batch)
    most_waiting = 16 * batch_size
    while True:
        batch, keys, still_waiting = [], set(), []
        for item in waiting:
            if len(batch) < batch_size and item.key not in keys:
                batch.append(item)
                keys.add(item.key)
            else:
                still_waiting.append(item)
        waiting = still_waiting
        for item in items if len(batch) < batch_size else ():
            if item.key in keys:
                waiting.append(item)
                if len(waiting) > most_waiting:
                    raise RuntimeError(
                        f"the stream holds fewer than {batch_size} distinct samples to fill a batch; "
                        "lower data.batch_size or add data"
                    )
                continue
            batch.append(item)
            keys.add(item.key)
            if len(batch) == batch_size:
                break
        yield batch
        if len(batch) < batch_size:
            return


class ShardStream(IterableDataset):
    """Batches of one rank for one epoch; ``len()`` is the number of batches, the same on every rank.

    Args:
        shards: every shard of every source with its size (``sources.resolve``).
        upsample: per source, how often its shards are drawn; whole numbers unless ``resampled``.
        num_samples: samples per epoch (a "virtual" epoch when ``resampled``).
        rank, world_size: this process's place in data-parallel training.
        resampled: draw shards with replacement, weighted by size × upsample, instead of reading each once.
        shuffle: shuffle shard order by (seed, epoch) and samples in a buffer of ``shuffle_buffer``.
    """

    def __init__(
        self,
        shards: list[Shard],
        transform: Callable,
        tokenizer: Callable,
        batch_size: int,
        num_samples: int,
        *,
        upsample: list[float] | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 2000,
        resampled: bool = False,
        image_key: str = "jpg;jpeg;png;webp",
        text_key: str = "txt",
        threshold_pairs: float = 0.0,
        threshold_pairs_cap: int | None = None,
        excluded: frozenset[tuple[str, str]] = frozenset(),
        retries: Retries = NO_RETRIES,
    ):
        self.retries = retries  # of remote shards that fail to open (samples.Retries)
        self.urls, self.sizes = [shard.url for shard in shards], [shard.size for shard in shards]
        # sizes a tar is checked against (those spread evenly from num_samples are guesses)
        self.listed_sizes = [shard.size if shard.listed else None for shard in shards]
        self.pair_ids = PairIds(self.urls, self.listed_sizes, seed, threshold_pairs, threshold_pairs_cap, num_samples)
        self.excluded = excluded  # (shard, key) pairs left out of training, e.g. an audit's flagged pairs
        upsample = upsample or [1.0] * (max(shard.source for shard in shards) + 1)
        self.weights = [shard.size * upsample[shard.source] for shard in shards]
        self.repeats = [round(upsample[shard.source]) for shard in shards]
        self.available = sum(size * repeat for size, repeat in zip(self.sizes, self.repeats))
        if not resampled and any(factor != round(factor) for factor in upsample):
            raise ValueError(f"upsample factors {upsample} must be whole numbers unless data.resampled=true")
        if not resampled and num_samples > self.available:
            raise ValueError(
                f"an epoch of {num_samples} samples is more than the {self.available} the shards hold; "
                "lower data.train_num_samples or set data.resampled=true"
            )
        self.transform, self.tokenizer = transform, tokenizer
        self.batch_size, self.num_samples = batch_size, num_samples
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.shuffle_buffer, self.resampled = shuffle, shuffle_buffer, resampled
        self.image_keys, self.text_key = image_keys(image_key), text_key
        self.batches = plan.batches_per_rank(num_samples, batch_size, world_size)
        self.donors: list[str] | None = None  # read by each worker process when it first plants a threshold pair
        # the loader sets this before each epoch; shared with worker processes, so persistent workers see it too
        self.epoch = multiprocessing.Value("i", epoch)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, Skips, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, counter = self.epoch.value, SkipCounter()
        quota = plan.worker_batches(self.batches, workers, worker) * self.batch_size
        buffer_rng = plan.rng_for(self.seed, epoch, self.rank, worker, 1)
        if self.resampled:
            own, spare = self._resampled(epoch, worker, counter), iter(())
        else:
            own, spare = self._stretches(epoch, worker, workers, quota, counter)
        if self.shuffle:
            own = wds.shuffle(self.shuffle_buffer, max(self.shuffle_buffer // 4, 1), rng=buffer_rng)(own)
        decoded = itertools.chain(self._decode(own, counter), self._decode(spare, counter, refill=True))
        batches = distinct_batches(decoded, self.batch_size)
        for produced in range(0, quota, self.batch_size):
            batch = next(batches)
            if len(batch) < self.batch_size:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker} found only {produced + len(batch)} readable samples of the "
                    f"{quota} it needs in epoch {epoch}, even reading every shard; see the warnings above"
                )
            counter.add("refilled", "", count=sum(item.refill for item in batch))  # counted when delivered
            images, captions, marks = (
                torch.stack([item.image for item in batch]),
                [item.caption for item in batch],
                torch.tensor([item.mark for item in batch], dtype=torch.int8),
            )
            ids = torch.tensor([item.pair_id for item in batch], dtype=torch.int64)
            planted = torch.tensor([item.planted for item in batch], dtype=torch.bool)
            yield images, self.tokenizer(captions), counter.take(), marks, ids, planted

    def _stretches(self, epoch: int, worker: int, workers: int, quota: int, counter: SkipCounter):
        """This worker's stretch of the epoch, and the positions it takes replacements from (``plan``)."""
        order = plan.epoch_order(self.sizes, self.repeats, self.seed, epoch, self.shuffle)
        start = plan.worker_start(self.batches, self.batch_size, self.rank, workers, worker)
        used = self.batches * self.batch_size * self.world_size
        ranges = plan.refill_ranges(
            used, self.available, (start, quota), self.world_size * workers, self.rank * workers + worker
        )
        shift = plan.epoch_shift(used, self.available, epoch)
        spare_pieces = [
            piece for begin, length in ranges for piece in plan.segments(order, self.sizes, shift + begin, length)
        ]
        own = read_segments(
            self.urls,
            self.listed_sizes,
            plan.segments(order, self.sizes, shift + start, quota),
            counter.add,
            self.retries,
        )
        spare = read_segments(self.urls, self.listed_sizes, spare_pieces, ignore, self.retries)
        return own, spare

    def _resampled(self, epoch: int, worker: int, counter: SkipCounter) -> Iterator[dict]:
        rng = plan.rng_for(self.seed, epoch, self.rank, worker, 2)
        empty_in_a_row = 0
        while empty_in_a_row < max(100, 2 * len(self.urls)):
            shard = rng.choices(range(len(self.urls)), weights=self.weights)[0]
            read = 0
            for read, sample in enumerate(
                shard_samples(self.urls[shard], 0, 1 << 62, counter.add, self.listed_sizes[shard], self.retries), 1
            ):
                yield sample
            empty_in_a_row = 0 if read else empty_in_a_row + 1
        # ends the stream; __iter__ then says how few samples it found

    def _decode(self, samples: Iterator[dict], counter: SkipCounter, refill: bool = False) -> Iterator[Decoded]:
        """Decoded samples; skips are counted by the reader that owns the sample (a refill's owner counted it).
        A threshold pair takes its donor caption (``threshold_caption``) and is left out of the noise marks."""
        report = ignore if refill else counter.add
        in_a_row = 0
        for sample in samples:
            if (sample["__url__"], sample["__key__"]) in self.excluded:
                report("excluded", sample["__url__"])
                continue
            try:
                image = image_of(sample, self.image_keys)
                caption = caption_of(sample, self.text_key)
                try:
                    image = self.transform(image)
                except Exception as exn:  # noqa: BLE001 - a transform that fails on one odd image must not end the run
                    raise BadSample("transform_failed", f"{sample['__key__']}: {exn!r}") from None
            except BadSample as bad:
                report(bad.kind, sample["__url__"], bad.detail)
                in_a_row += 1
                if in_a_row >= MAX_CONSECUTIVE_SKIPS:
                    raise RuntimeError(
                        f"{in_a_row} samples in a row were unusable (last: {bad}); check "
                        "data.image_key / data.text_key and the shards"
                    ) from None
                continue
            in_a_row = 0
            pair_id = self.pair_ids.of(sample["__url__"], sample["__key__"], sample["__index__"])
            mark, donor = noise_mark(sample), self.threshold_caption(pair_id, caption)
            planted = donor is not None
            if planted:
                caption, mark = donor, -1
            key = (sample["__url__"], sample["__key__"])
            yield Decoded(image, caption, mark, key, refill, pair_id, planted)

    def threshold_caption(self, pair_id: int, own: str) -> str | None:
        """The wrong caption a threshold pair is given, the same in every epoch: its seeded place in the donor pool,
        or the next pool caption that differs from its own; None for any other pair."""
        if not self.pair_ids.threshold_share:
            return None
        if self.donors is None:
            self.donors = self.donor_pool()
        place = self.pair_ids.donor(pair_id, len(self.donors))
        if place is None:
            return None
        pool = len(self.donors)
        others = (self.donors[(place + offset) % pool] for offset in range(pool))
        return next((caption for caption in others if caption != own), None)

    def donor_pool(self) -> list[str]:
        """The first ``DONOR_POOL`` readable captions of the shards in listed order (skips are counted where the
        training stream reads them); a remote dataset pays one partial read of its first shard per worker."""
        pool: list[str] = []
        for url, listed in zip(self.urls, self.listed_sizes):
            for sample in shard_samples(url, 0, DONOR_POOL - len(pool), ignore, listed, self.retries):
                try:
                    pool.append(caption_of(sample, self.text_key))
                except BadSample:
                    continue
            if len(pool) >= DONOR_POOL:
                break
        return pool


def noise_mark(sample: dict) -> int:
    """1 if the sample's json marks its caption as corrupted, 0 if as clean, -1 if it does not say."""
    try:
        corrupted = json.loads(sample["json"]).get("corrupted")
    except (KeyError, ValueError, AttributeError):
        return -1
    return int(corrupted) if isinstance(corrupted, bool) else -1


def leave_sigterm_to_the_main_process(worker_id: int) -> None:
    """SLURM, Kubernetes and ``timeout`` send SIGTERM to the whole process group: a data worker killed by it would
    crash the run before the main process saves its checkpoint and stops (psdclip.callbacks.checkpointing)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class EpochLoader(DataLoader):
    """DataLoader that tells the stream which epoch begins (``current_epoch()``, the trainer's), so shard order and
    sample shuffle follow seed + epoch also after resuming from a checkpoint and with persistent workers. Without
    ``current_epoch`` each new iteration is the next epoch. ``batches_to_skip(epoch)``, asked as an epoch's stream
    starts, gives how many of its first batches to pass over (those a resumed run already trained on)."""

    def __init__(
        self,
        dataset: ShardStream,
        current_epoch: Callable[[], int] | None = None,
        batches_to_skip: Callable[[int], int] | None = None,
        **kwargs,
    ):
        super().__init__(dataset, batch_size=None, worker_init_fn=leave_sigterm_to_the_main_process, **kwargs)
        self.current_epoch, self.batches_to_skip, self.iterations = current_epoch, batches_to_skip, 0

    def __iter__(self):
        # a generator, so nothing happens until the first batch is asked for: Lightning calls iter() once early, to
        # check the loader, before it has restored a checkpoint's epoch
        if self.current_epoch is not None:
            self.dataset.epoch.value = self.current_epoch()
        elif self.iterations:
            self.dataset.epoch.value += 1
        self.iterations += 1
        batches = super().__iter__()
        for _ in range(self.batches_to_skip(self.dataset.epoch.value) if self.batches_to_skip else 0):
            next(batches)
        yield from batches
