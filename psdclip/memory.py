"""Per-pair evidence across epochs: a table, keyed by each pair's identity, of an exponential average of the
teacher's gap (how far its best candidate outscores the pair) over the pair's appearances.

Identities come from the data (``psdclip.data``): where every shard's size is known, a pair's identity is a dense
index (its shard's offset plus its place in the shard), one slot per pair and no collisions; otherwise a 63-bit
hash of (shard, key), folded into a fixed number of slots, where two pairs may meet: the newcomer takes the slot and
the meeting is counted (``collisions``). The table holds 4 bytes a slot (fp16 average, a sighting count that stops
at 255, a threshold-pair flag) plus a 4-byte fingerprint for hashed identities.

Every rank records the same gathered ids and gaps, so the table is identical on every rank; it is a set of buffers
of the module, so it travels in the checkpoint and a resumed run continues from it exactly.
"""

import torch
from torch import Tensor, nn

MAX_SIGHTINGS = 255  # the count is a uint8; the average needs no more
HASHED_SLOTS = 1 << 24  # a table sized by the data whose pairs have no dense identity: 16.8M slots, 134 MB


class PairMemory(nn.Module):
    """Args:
    decay: weight of a pair's earlier appearances in its average (0: only the last one counts).
    slots: table size; null: sized by the data (one slot per pair) when training starts (``allocate``).
    """

    def __init__(self, decay: float, slots: int | None):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"memory decay must be in [0, 1), got {decay}")
        if slots is not None and slots < 1:
            raise ValueError(f"memory slots must be a positive number or null (sized by the data), got {slots}")
        self.decay, self.configured_slots = decay, slots
        self.register_buffer("collisions", torch.zeros((), dtype=torch.int64))
        self.allocate(slots or 1)

    def fit_data(self, pair_space: int | None) -> None:
        """Size the table for the data unless ``slots`` was given: one slot per pair where identities are dense
        (``pair_space`` pairs), ``HASHED_SLOTS`` otherwise."""
        if self.configured_slots is None:
            self.allocate(pair_space or HASHED_SLOTS)

    def allocate(self, slots: int) -> None:
        """An empty table of ``slots`` slots (on the device the module is on)."""
        device = self.collisions.device
        self.register_buffer("scores", torch.zeros(slots, dtype=torch.float16, device=device))
        self.register_buffer("sightings", torch.zeros(slots, dtype=torch.uint8, device=device))
        self.register_buffer("planted", torch.zeros(slots, dtype=torch.bool, device=device))
        self.register_buffer("fingerprints", torch.zeros(slots, dtype=torch.int32, device=device))
        self.collisions.zero_()

    @property
    def slots(self) -> int:
        return len(self.scores)

    def nbytes_per_slot(self) -> int:
        return sum(buffer.element_size() for buffer in (self.scores, self.sightings, self.planted, self.fingerprints))

    @torch.no_grad()
    def record(self, pair_ids: Tensor, gaps: Tensor, planted: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Add one appearance of each pair; returns each pair's average including it (fp32) and its sightings."""
        slot = pair_ids % self.slots
        fingerprint = (pair_ids // self.slots).to(torch.int32)  # 0 for dense identities, which never collide
        seen = self.sightings[slot].long()
        taken = (seen > 0) & (self.fingerprints[slot] != fingerprint)
        self.collisions += taken.sum()
        seen = torch.where(taken, 0, seen)
        previous = self.scores[slot].float()
        average = torch.where(seen > 0, self.decay * previous + (1 - self.decay) * gaps.float(), gaps.float())
        sightings = (seen + 1).clamp(max=MAX_SIGHTINGS)
        self.scores[slot] = average.to(self.scores.dtype)
        self.sightings[slot] = sightings.to(self.sightings.dtype)
        self.fingerprints[slot] = fingerprint
        self.planted[slot] = planted if planted is not None else torch.zeros_like(taken)
        return average, sightings

    def quantile_of(self, quantile: float | Tensor, min_sightings: int, planted: bool = True) -> Tensor:
        """The ``quantile`` of the threshold pairs' averages (``planted``; else of the data's own pairs), of those seen
        ``min_sightings`` times, by rank; NaN when there are none. Sorts the table, with no host sync."""
        valid = self.seen(min_sightings, planted)
        ordered = torch.where(valid, self.scores.float(), torch.inf).sort().values
        count = valid.sum()
        index = (quantile * (count - 1).clamp(min=0)).floor().long()
        return torch.where(count > 0, ordered.gather(0, index.view(1)).squeeze(0), torch.nan)

    def share_above(self, threshold: Tensor, min_sightings: int, planted: bool = False) -> Tensor:
        """The share of the data's own pairs (with ``planted``: of the threshold pairs) seen ``min_sightings`` times
        whose average is above ``threshold``; NaN when there are none."""
        valid = self.seen(min_sightings, planted)
        return ((self.scores.float() > threshold) & valid).sum() / valid.sum()

    def seen(self, min_sightings: int, planted: bool) -> Tensor:
        """Mask of the threshold pairs (``planted``) or the data's own pairs seen ``min_sightings`` times."""
        return (self.planted == planted) & (self.sightings >= min_sightings)
