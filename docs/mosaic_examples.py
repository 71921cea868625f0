"""Draws docs/mosaic_examples.png: a few train mosaics of data=embedded_mosaic with their captions, clean and
corrupted (partial and swap noise; corrupted captions in red).

    PYTHONPATH=. python docs/mosaic_examples.py [fashion_mnist_dir]   # or after `make install`, without PYTHONPATH
"""

import sys
import tempfile
import textwrap
from pathlib import Path

import matplotlib
import webdataset as wds

from psdclip.data.mosaic import MosaicShards

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SOURCE = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"
OUT = Path(__file__).with_name("mosaic_examples.png")
PER_KIND = 3


def examples(kind: str, cache: str) -> list[dict]:
    """The first clean and the first corrupted train mosaics with noise ``kind`` at 0.5."""
    shards = MosaicShards("train", SOURCE, cache, noise=0.5, noise_kind=kind, size=40, shard_size=40)
    shards.ensure()
    samples = list(
        wds.DataPipeline(
            wds.SimpleShardList(shards.pattern),
            wds.tarfile_to_samples(),
            wds.decode("l8"),
        )
    )
    clean = [s for s in samples if not s["json"]["corrupted"]]
    wrong = [s for s in samples if s["json"]["corrupted"]]
    return clean[:1] + wrong[: PER_KIND - 1]


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        rows = {kind: examples(kind, cache) for kind in ("partial", "swap")}
    figure, axes = plt.subplots(len(rows), PER_KIND, figsize=(4.2 * PER_KIND, 3.6 * len(rows)))
    for row, (kind, samples) in enumerate(rows.items()):
        for column, sample in enumerate(samples):
            axis, meta = axes[row][column], sample["json"]
            axis.imshow(sample["png"], cmap="gray", interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            state = f"{kind} noise: wrong at {meta['wrong_positions']}" if meta["corrupted"] else "clean"
            color = "firebrick" if meta["corrupted"] else "black"
            axis.set_title(f"{state}\n{textwrap.fill(sample['txt'], 40)}", fontsize=8, color=color)
    figure.suptitle(
        "data=embedded_mosaic: four Fashion-MNIST items, a caption naming them in reading order",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(OUT, dpi=100)
    print(OUT)


if __name__ == "__main__":
    main()
