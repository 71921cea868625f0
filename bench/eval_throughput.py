"""Zero-shot evaluation throughput of the tiny model on the embedded Fashion-MNIST test split.

Prints images/s and the split between feature extraction (image encoding) and everything else (class weights,
logits, metrics). Aim: the metric code adds under 5% to feature extraction.

    python bench/eval_throughput.py [--images 10000] [--batch-size 500] [--threads N] [--repeats 2]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's psdclip, not an installed one

from psdclip.eval.datasets import FashionMNISTEvalSet
from psdclip.eval.model import load_encoders
from psdclip.eval.suite import EvalSuite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion-mnist-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache/psdclip"))
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up run; the best is reported")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_encoders(name="psdclip-vit-tiny").eval()
    dataset = FashionMNISTEvalSet(args.fashion_mnist_dir, args.cache_dir)
    suite = EvalSuite({"fashion_mnist": dataset}, ["zeroshot"], batch_size=args.batch_size)
    suite.run(model)  # warm-up: writes the shards on first use, warms the allocator
    runs = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        suite.run(model)
        runs.append((time.perf_counter() - started, dict(suite.timings)))
    total, timings = min(runs, key=lambda run: run[0])
    images = dataset.splits["test"].num_samples
    features, rest = timings["features"], total - timings["features"]
    print(
        f"zero-shot, psdclip-vit-tiny, {images} Fashion-MNIST test images, batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    print(f"  total            {total:7.2f} s   {images / total:8.0f} images/s")
    print(f"  image features   {features:7.2f} s   {images / features:8.0f} images/s (decode + transform + encode)")
    print(
        f"  metrics          {rest:7.2f} s   {100 * rest / features:6.2f}% of feature time (class weights, logits, metrics)"
    )


if __name__ == "__main__":
    main()
