"""Write your own image–caption pairs as training shards (img2dataset's layout, with ``sizes.json``).

    python -m psdclip.data.make_shards photos/ $PSDCLIP_DATA_ROOT/mine            # photo.jpg + photo.txt pairs
    python -m psdclip.data.make_shards pairs.csv $PSDCLIP_DATA_ROOT/mine --image-column path --caption-column text
    python -m psdclip.data.make_shards pairs.parquet $PSDCLIP_DATA_ROOT/mine

A folder is searched recursively for images whose caption sits in a file of the same stem (``.txt``, or a ``.json``
with a ``caption`` field). CSV/TSV/Parquet tables name the image path (relative paths are taken from the table's
folder) and the caption. Each sample gets ``<key>.<jpg|png|webp>``, ``<key>.txt`` and ``<key>.json`` (key, caption,
source path, width, height). JPEG, PNG and WebP files are stored byte for byte; other formats are re-encoded as JPEG.
Images that do not open and missing, empty or non-UTF-8 captions are skipped and counted (the kinds the training
reader counts); the summary says how many. A folder that already holds files is refused unless ``--overwrite``
(delete its shards and ``sizes.json`` first) or ``--append`` (number the new shards after the old ones).
"""

import argparse
import csv
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from psdclip.data.samples import BadSample, caption_of
from psdclip.data.writer import (
    SIZES_FILE,
    encode_image,
    shard_numbers,
    shard_pattern,
    write_shards,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


# (image, caption files as a webdataset sample, text key): captions are decoded by the training reader's caption_of,
# so a caption it would skip (missing, empty, not UTF-8) is skipped and counted here too, never stored mangled
Pair = tuple[Path, dict, str]


def folder_pairs(folder: Path) -> Iterator[Pair]:
    """Every image under ``folder``; the caption from ``<stem>.txt`` or the ``caption`` field of ``<stem>.json``."""
    for image in sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES):
        text, meta, key = image.with_suffix(".txt"), image.with_suffix(".json"), str(image.with_suffix(""))
        if text.is_file():
            yield image, {"__key__": key, "txt": text.read_bytes()}, "txt"
        elif meta.is_file():
            yield image, {"__key__": key, "json": meta.read_bytes()}, "json:caption"
        else:
            yield image, {"__key__": key}, "txt"


def table_pairs(table: Path, image_column: str, caption_column: str) -> Iterator[Pair]:
    """Every row of a CSV/TSV or Parquet table."""
    if table.suffix.lower() == ".parquet":
        try:
            import pandas as pd

            rows = pd.read_parquet(table).to_dict("records")
        except ImportError as exn:
            raise SystemExit(f"reading {table} needs pandas and pyarrow: pip install pandas pyarrow ({exn})")
    else:
        # surrogateescape keeps undecodable bytes, so that caption_of counts a non-UTF-8 caption as one skipped row
        with open(table, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if table.suffix.lower() == ".tsv" else ","))
    if rows and (image_column not in rows[0] or caption_column not in rows[0]):
        raise SystemExit(f"{table} has columns {list(rows[0])}; choose --image-column and --caption-column among them")
    for index, row in enumerate(rows):
        path = Path(str(row[image_column]))
        caption = row[caption_column]
        fields = {"txt": caption.encode("utf-8", "surrogateescape")} if isinstance(caption, str) else {}
        yield (
            (path if path.is_absolute() else table.parent / path),
            {"__key__": f"{table} row {index}", **fields},
            "txt",
        )


def samples(pairs: Iterator[Pair], skipped: Counter, first_key: int = 0) -> Iterator[dict]:
    for index, (path, fields, text_key) in enumerate(pairs, start=first_key):
        try:
            caption = caption_of(fields, text_key)
        except BadSample as bad:
            skipped[bad.kind.replace("_", " ")] += 1
            log.warning("skipping %s: %s", path, bad)
            continue
        try:
            data = path.read_bytes()
            with Image.open(path) as image:
                image.load()
                extension = KEPT_FORMATS.get(image.format)
                size = image.size
                if extension is None:
                    data, extension = encode_image(image.convert("RGB"), "jpg"), "jpg"
        except Exception as exn:  # noqa: BLE001 - missing file, unknown format, truncated bytes
            skipped["image unreadable"] += 1
            log.warning("skipping %s: %r", path, exn)
            continue
        key = f"{index:09d}"
        meta = {"key": key, "caption": caption, "source": str(path), "width": size[0], "height": size[1]}
        yield {"__key__": key, extension: data, "txt": caption, "json": json.dumps(meta)}


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(
        prog="python -m psdclip.data.make_shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, help="folder of images with captions, or a .csv/.tsv/.parquet table")
    parser.add_argument("out_dir", type=Path, help="folder for the shards and sizes.json")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard (img2dataset's default)")
    parser.add_argument("--prefix", default="", help="shard file name prefix")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="caption")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--overwrite", action="store_true", help="delete the shards and sizes.json out_dir holds first"
    )
    existing.add_argument(
        "--append", action="store_true", help="number the new shards (and keys) after those out_dir holds"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.source.is_dir():
        pairs = folder_pairs(args.source)
    elif args.source.is_file():
        pairs = table_pairs(args.source, args.image_column, args.caption_column)
    else:
        raise SystemExit(f"{args.source} is neither a folder nor a table file")
    first_shard, first_key = prepare_output(args.out_dir, args.prefix, args.overwrite, args.append)
    skipped: Counter = Counter()
    sizes = write_shards(
        samples(pairs, skipped, first_key),
        args.out_dir,
        prefix=args.prefix,
        shard_size=args.shard_size,
        first_shard=first_shard,
    )
    written = sum(sizes.values())
    if not written:
        raise SystemExit(f"no usable image–caption pair found in {args.source} (skipped: {dict(skipped) or 'none'})")
    pattern = shard_pattern(args.out_dir, args.prefix, first_shard + len(sizes) - 1)
    after = f" after the {first_shard} already there" if first_shard else ""
    print(f"wrote {written} samples in {len(sizes)} shards{after}; the shards: {pattern}")
    # quoted twice: the shell keeps the braces, Hydra reads the value as a string instead of a dictionary
    print(f"train on them with: python train.py data=shards \"data.train_shards='{pattern}'\"")
    if skipped:
        print("skipped: " + ", ".join(f"{count} {reason}" for reason, count in skipped.items()))
    return sizes


def prepare_output(out_dir: Path, prefix: str, overwrite: bool, append: bool) -> tuple[int, int]:
    """The first shard number and sample key to write; refuses a folder that holds files unless told what to do
    with them, since new shards among old ones would replace some and leave stale ones beside them."""
    entries = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if entries and not (overwrite or append):
        raise SystemExit(
            f"{out_dir} is not empty (it holds {len(entries)} entries, e.g. {entries[0].name}): add --overwrite "
            "to delete its shards and sizes.json first, or --append to add shards after them"
        )
    if overwrite:
        for path in [*out_dir.glob("*.tar"), out_dir / SIZES_FILE]:
            path.unlink(missing_ok=True)
        return 0, 0
    numbers = shard_numbers(out_dir, prefix) if append else []
    if not numbers:
        return 0, 0
    last = out_dir / f"{prefix}{numbers[-1]:06d}.tar"
    with tarfile.open(last) as tar:  # keys grow through the shards: the last one holds the largest
        keys = [name.split(".", 1)[0] for name in tar.getnames()]
    return numbers[-1] + 1, max((int(key) for key in keys if key.isdigit()), default=-1) + 1


if __name__ == "__main__":
    main()
