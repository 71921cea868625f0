"""Samples/s of the training stream (read + decode + open_clip train preprocessing + tokenise, batched) against
open_clip's own ``open_clip_train.data.get_wds_dataset`` on the same JPEG shards, alternating rounds for fairness.

    python -m bench.data_throughput                      # 8 shards × 250 JPEGs of 256×256, 2 workers, batch 64
    python -m bench.data_throughput --rounds 5 --shards 16

Each round iterates one epoch of each loader; the clock starts at the first batch, so worker start-up is left out.
"""

import argparse
import functools
import statistics
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import open_clip
import open_clip_train.data
import webdataset as wds
from open_clip_train.data import get_wds_dataset
from PIL import Image

from psdclip.data import ShardDataModule
from psdclip.data.pipeline import EpochLoader
from psdclip.data.writer import encode_image, write_shards

# webdataset 1.x ends each shard with an empty end-of-shard marker that open_clip 3.3's group_by_keys_nothrow does
# not expect (KeyError 'fname'); without the marker its pipeline runs exactly as written
open_clip_train.data.tar_file_expander = functools.partial(wds.tariterators.tar_file_expander, eof_value=None)


def make_shards(folder: Path, shards: int, per_shard: int, size: int) -> str:
    """Photo-like JPEGs (smooth gradients plus noise compress and decode like real photos) with captions."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size, dtype=np.float32)

    def samples():
        for i in range(shards * per_shard):
            colour = rng.random((1, 1, 3), dtype=np.float32)
            pixels = 255 * (colour * ramp[:, None, None] + (1 - colour) * ramp[None, :, None])
            pixels += rng.normal(0, 12, pixels.shape)
            image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
            caption = f"a photo of object {i} with {rng.integers(1, 9)} colourful things on a table"
            yield {"__key__": f"{i:09d}", "jpg": encode_image(image, "jpg"), "txt": caption}

    write_shards(samples(), folder, shard_size=per_shard)
    return str(folder / f"{{000000..{shards - 1:06d}}}.tar")


def timed(loader, batch_size: int) -> float:
    iterator = iter(loader)
    next(iterator)  # start-up (worker spawn, first shard open) is not throughput
    start, samples = time.perf_counter(), 0
    for batch in iterator:
        samples += len(batch[0])
    return samples / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=256, help="img2dataset's default resize")
    parser.add_argument("--model", default="ViT-B-32", help="whose preprocessing and tokenizer to use")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    model_cfg = open_clip.get_model_config(args.model)
    transform = open_clip.image_transform(model_cfg["vision_cfg"]["image_size"], is_train=True)
    tokenizer = open_clip.get_tokenizer(args.model)
    with tempfile.TemporaryDirectory() as folder:
        pattern = make_shards(Path(folder), args.shards, args.per_shard, args.image_size)
        total = args.shards * args.per_shard
        ours = ShardDataModule(
            pattern,
            batch_size=args.batch_size,
            num_workers=args.workers,
            shuffle_buffer=5000,
            transform=transform,
            tokenizer=tokenizer,
        )
        our_loader = EpochLoader(
            ours.stream(), current_epoch=lambda: 0, num_workers=args.workers, persistent_workers=True
        )
        theirs = get_wds_dataset(
            Namespace(
                train_data=pattern,
                val_data=None,
                train_num_samples=total,
                dataset_resampled=False,
                train_data_upsampling_factors=None,
                seed=0,
                batch_size=args.batch_size,
                workers=args.workers,
                world_size=1,
            ),
            transform,
            is_train=True,
            tokenizer=tokenizer,
        ).dataloader
        rates = {"psdclip": [], "open_clip": []}
        for round_ in range(args.rounds):
            # alternate which goes first, so drifting load on the shared machine hits both alike
            order = ["psdclip", "open_clip"] if round_ % 2 == 0 else ["open_clip", "psdclip"]
            for name in order:
                rates[name].append(timed(our_loader if name == "psdclip" else theirs, args.batch_size))
            print(f"round {round_ + 1}: " + "  ".join(f"{name} {rates[name][-1]:.1f}/s" for name in order), flush=True)
    ours_rate, theirs_rate = statistics.median(rates["psdclip"]), statistics.median(rates["open_clip"])
    print(
        f"\n{total} JPEGs {args.image_size}px in {args.shards} shards, {args.model} train preprocessing + "
        f"tokenizer, batch {args.batch_size}, {args.workers} workers, median of {args.rounds} rounds"
    )
    print(f"psdclip ShardDataModule        {ours_rate:8.1f} samples/s")
    print(f"open_clip get_wds_dataset      {theirs_rate:8.1f} samples/s")
    print(f"ratio psdclip / open_clip      {ours_rate / theirs_rate:8.2f}")


if __name__ == "__main__":
    main()
