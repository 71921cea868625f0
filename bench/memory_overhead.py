"""What the pair memory costs a training step: the memory rule's time per step against the single-batch rule's, for a
global batch against a table the size of a real dataset, and its bytes per pair.

The rule runs on the teacher's logits of a global batch of N pairs: it records each pair's gap in the table (gather,
exponential average, scatter) and, every ``refresh_every`` steps, sorts the table for the calibrated threshold. The
figure to compare is the extra time per step against the time of a whole training step (``--step-ms``: measure it
with bench/train_throughput.py on the same machine; the default is the tiny model's CPU step at batch 128).

    python bench/memory_overhead.py [--batch 4096] [--pairs 12400000] [--device cuda] [--step-ms 250]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's psdclip, not an installed one

from psdclip.memory import PairMemory
from psdclip.subsets import MemorySubset, OutscoredSubset, SubsetQuery

DATASETS = {"CC3M": 3_300_000, "CC12M": 12_400_000, "YFCC15M": 15_000_000, "LAION-400M": 400_000_000}


def query(batch: int, pairs: int, step: int, device: str) -> SubsetQuery:
    logits = torch.randn(batch, batch, device=device) * 5
    ids = torch.randint(0, pairs, (batch,), device=device)
    planted = torch.rand(batch, device=device) < 0.03
    return SubsetQuery(
        logits, logits.T, torch.arange(batch, device=device), torch.tensor(batch // 2), step, 10**6, ids, planted
    )


def per_step_ms(rule, batch: int, pairs: int, device: str, steps: int) -> float:
    rule(query(batch, pairs, 1, device))  # warm-up, at a step that refreshes no threshold
    queries = [query(batch, pairs, step, device) for step in range(2, steps + 2)]
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for item in queries:
        rule(item)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096, help="global batch (N)")
    parser.add_argument("--pairs", type=int, default=DATASETS["CC12M"], help="table slots (dataset pairs)")
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--step-ms", type=float, default=250.0, help="a whole training step, for the share")
    args = parser.parse_args()

    outscored = OutscoredSubset(margin=2.0, ramp=0.0)
    memory = PairMemory(decay=0.5, slots=args.pairs)
    rule = MemorySubset(memory, outscored, 3, 0.2, 1.0, 0.5, args.refresh_every, 0.03, None, 2.0, 8.0, 0.25, 1.0).to(
        args.device
    )
    single = per_step_ms(outscored, args.batch, args.pairs, args.device, args.steps)
    remembering = per_step_ms(rule, args.batch, args.pairs, args.device, args.steps)
    extra = remembering - single
    print(
        f"device {args.device}, global batch {args.batch}, table {args.pairs:,} slots, refresh every {args.refresh_every}"
    )
    print(f"outscored rule {single:.2f} ms/step, memory rule {remembering:.2f} ms/step: +{extra:.2f} ms")
    print(f"share of a {args.step_ms:.0f} ms step: {100 * extra / args.step_ms:.2f}%")
    print(
        f"bytes per pair: {memory.nbytes_per_slot()} (fp16 average, uint8 sightings, bool threshold flag, int32 fingerprint)"
    )
    for name, pairs in DATASETS.items():
        print(f"  {name}: {pairs * memory.nbytes_per_slot() / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
