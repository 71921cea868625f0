"""Where a query's first positive lands in its ranked candidates — the one primitive behind top-k accuracy and Recall@k."""

import torch
from torch import Tensor

ROWS_PER_CHUNK = 1024  # bounds the (rows, candidates) temporaries


def first_positive_rank(scores: Tensor, positives: Tensor) -> Tensor:
    """0-based rank of each row's best positive when candidates are sorted by descending score.

    Ties are broken in favour of the lower candidate index (a stable descending sort; ``argmax`` does the same),
    so the result never depends on a sort's implementation. ``scores`` and ``positives`` are (queries, candidates);
    every query needs at least one positive.
    """
    if scores.shape != positives.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} differ in shape")
    if not positives.any(dim=1).all():
        raise ValueError("every query needs at least one positive candidate")
    ranks = []
    index = torch.arange(scores.shape[1], device=scores.device)
    for start in range(0, len(scores), ROWS_PER_CHUNK):
        s, p = scores[start : start + ROWS_PER_CHUNK], positives[start : start + ROWS_PER_CHUNK]
        best = s.masked_fill(~p, float("-inf")).amax(dim=1, keepdim=True)
        # the earliest positive that reaches the best positive score is the one a stable sort ranks first
        first = (p & (s == best)).int().argmax(dim=1, keepdim=True)
        ahead = (s > best) | ((s == best) & (index < first))
        ranks.append(ahead.sum(dim=1))
    return torch.cat(ranks)


def hit_rate(ranks: Tensor, k: int) -> float:
    """Fraction of queries whose first positive is among the top ``k``."""
    return (ranks < k).float().mean().item()
