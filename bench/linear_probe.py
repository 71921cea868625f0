"""Time of the linear probe alone on the embedded Fashion-MNIST features (the `full` evaluation's probe).

Encodes the probe's train images (the first 5000 of the embedded train split) and the 10k test images once with
psdclip-vit-tiny (random weights unless --ckpt), caches the features, then times ``linear_probe`` with the
`full`/`default` evaluation settings and prints the chosen C, test top-1 and the seconds taken.

    python bench/linear_probe.py [--ckpt last.ckpt] [--threads 1] [--repeats 1]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's psdclip, not an installed one

from psdclip.eval.datasets import FashionMNISTEvalSet
from psdclip.eval.features import Runtime
from psdclip.eval.linear_probe import linear_probe
from psdclip.eval.model import load_encoders
from psdclip.eval.suite import EvalSuite

# the probe settings evaluate.py uses: read from their one owner, the evaluation config
SWEEP = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "evaluation" / "default.yaml").linear_probe)


def features(args) -> dict[str, torch.Tensor]:
    cache = Path(args.features_dir) / f"psdclip-probe-features-{Path(args.ckpt).stem if args.ckpt else 'random'}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    torch.manual_seed(0)
    model = load_encoders(args.ckpt, "psdclip-vit-tiny").eval()
    dataset = FashionMNISTEvalSet(args.fashion_mnist_dir, args.cache_dir)
    suite = EvalSuite({"fashion_mnist": dataset}, ["linear_probe"], batch_size=500)
    train, test = (suite.features(model, dataset, split, Runtime()) for split in ("train", "test"))
    found = {"train": train.images, "train_labels": train.labels, "test": test.images, "test_labels": test.labels}
    torch.save(found, cache)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion-mnist-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache/psdclip"))
    parser.add_argument("--features-dir", default="/tmp", help="where the encoded features are kept between runs")
    parser.add_argument("--ckpt", default=None, help="a training checkpoint; random weights (seed 0) without")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; the best is reported")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    found = features(args)
    runs = []
    for _ in range(args.repeats):
        started, cpu = time.perf_counter(), time.process_time()
        metrics = linear_probe(found["train"], found["train_labels"], found["test"], found["test_labels"], 10, **SWEEP)
        runs.append((time.perf_counter() - started, time.process_time() - cpu))
    print(
        f"linear probe, {len(found['train'])} train × {found['train'].shape[1]} features, {len(found['test'])} test, "
        f"{torch.get_num_threads()} threads"
    )
    wall, cpu = min(runs)
    print(
        f"  time  {wall:7.2f} s wall, {cpu:.2f} s CPU (best of {len(runs)}; CPU time is the figure to trust on a busy machine)"
    )
    print(f"  C     {metrics['C']:.4g}")
    print(f"  top1  {metrics['top1']:.4f}")


if __name__ == "__main__":
    main()
