"""Which samples each rank and data worker reads in an epoch — pure arithmetic on shard sizes, identical on every rank.

An epoch without resampling is one sequence of sample positions: the shards in an order shuffled by (seed, epoch),
each source's shards repeated ``upsample`` times. Of ``num_samples`` positions every rank takes
``K = num_samples // (world_size * batch_size)`` full batches as one contiguous stretch, which it shares among its
workers in contiguous slices of whole batches. So every rank yields exactly K batches, no sample is read twice, and the
``num_samples mod (world_size * batch_size)`` positions at the end are left for this epoch (they fall elsewhere in the
next one). A worker replaces each unreadable sample with the next one from the positions no rank uses, then from
the following worker's stretch; those replacements are counted as ``refilled``.
"""

import bisect
import random
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """``take`` consecutive samples of shard ``shard`` after skipping its first ``skip``."""

    shard: int
    skip: int
    take: int


def rng_for(*keys: int) -> random.Random:
    """A random generator determined by the keys alone (seed, epoch, rank, worker, …)."""
    return random.Random(int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0]))


def epoch_order(sizes: list[int], repeats: list[int], seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Shard indices in this epoch's reading order: shard i appears repeats[i] times, shuffled by (seed, epoch)."""
    order = [index for index, count in enumerate(repeats) for _ in range(count) if sizes[index] > 0]
    if shuffle:
        rng_for(seed, epoch).shuffle(order)
    return order


def segments(order: list[int], sizes: list[int], start: int, length: int) -> list[Segment]:
    """The shard pieces covering positions [start, start + length) of the sequence ``order``, wrapping at its end."""
    ends = np.cumsum([sizes[index] for index in order]).tolist()
    total = ends[-1] if ends else 0
    pieces, position = [], start % total if total else 0
    while length > 0 and total:
        slot = bisect.bisect_right(ends, position)
        begin = ends[slot] - sizes[order[slot]]
        take = min(ends[slot] - position, length)
        pieces.append(Segment(order[slot], position - begin, take))
        length -= take
        position = (position + take) % total
    return pieces


def batches_per_rank(num_samples: int, batch_size: int, world_size: int) -> int:
    return num_samples // (batch_size * world_size)


def worker_batches(rank_batches: int, workers: int, worker: int) -> int:
    """Batches of ``worker``: an even share, the first ``rank_batches % workers`` workers one more."""
    return rank_batches // workers + (worker < rank_batches % workers)


def worker_start(rank_batches: int, batch_size: int, rank: int, workers: int, worker: int) -> int:
    """First position of the worker's stretch: its rank's stretch, then the slices of the workers before it."""
    return batch_size * (rank * rank_batches + sum(worker_batches(rank_batches, workers, w) for w in range(worker)))


def refill_start(num_samples: int, used: int, available: int, world_size: int, workers: int, rank: int, worker: int) -> int:
    """Where a worker takes replacements from: its share of the positions this epoch leaves unused."""
    workers_total = world_size * workers
    unused = max(available - used, 0)
    return used + (rank * workers + worker) * (unused // workers_total)
