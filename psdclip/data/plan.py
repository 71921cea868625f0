"""Which samples each rank and data worker reads in an epoch — pure arithmetic on shard sizes, identical on every rank.

An epoch without resampling is one sequence of sample positions: the shards in an order shuffled by (seed, epoch),
each source's shards repeated ``upsample`` times, read from where the previous epoch stopped (``epoch_shift``). Of
``num_samples`` positions every rank takes ``K = num_samples // (world_size * batch_size)`` full batches as one
contiguous stretch, which it shares among its workers in contiguous slices of whole batches. So every rank yields
exactly K batches, no position is read twice by the stretches, and the positions the epoch leaves unread move on
with the next one: a sample is never left out of every epoch, even in a single shard.

A worker replaces each unreadable sample (``refilled``) from, in order: its own share of the positions no stretch
uses, the other workers' shares, then (only when the epoch leaves too few unused positions) its own stretch again,
then the rest of the epoch. Shares are disjoint, so replacements repeat no sample of the epoch while the worker's own
unused share lasts; a repeated one comes from the worker's own stretch, never from one all workers share. The
stream never puts the same sample twice in one batch (``pipeline``).
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


def epoch_shift(used: int, available: int, epoch: int) -> int:
    """Where epoch ``epoch`` starts reading: each epoch of ``used`` positions continues where the previous stopped."""
    return epoch * used % available if available else 0


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


def unused_share(used: int, available: int, slots: int, slot: int) -> tuple[int, int]:
    """(start, length) of ``slot``'s share of the positions [used, available) that no stretch reads; the shares of
    ``slots`` slots are disjoint and cover them all (the first ``unused % slots`` one longer)."""
    share, extra = divmod(max(available - used, 0), slots)
    return used + slot * share + min(slot, extra), share + (slot < extra)


def refill_ranges(used: int, available: int, stretch: tuple[int, int], slots: int, slot: int) -> list[tuple[int, int]]:
    """The (start, length) ranges a worker takes replacements from, in order (see the module's docstring): its unused
    share, the rest of the unused positions, its own ``stretch`` (start, length), then every other used position."""
    share_start, share_length = unused_share(used, available, slots, slot)
    share_end, (own_start, own_length) = share_start + share_length, stretch
    ranges = [
        (share_start, share_length),
        (share_end, available - share_end),
        (used, share_start - used),
        (own_start, own_length),
        (own_start + own_length, used - own_start - own_length),
        (0, own_start),
    ]
    return [(start, length) for start, length in ranges if length > 0]
