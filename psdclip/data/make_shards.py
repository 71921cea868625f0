"""Write your own image–caption pairs as training shards (img2dataset's layout, with ``sizes.json``).

    python -m psdclip.data.make_shards photos/ $PSDCLIP_DATA_ROOT/mine            # photo.jpg + photo.txt pairs
    python -m psdclip.data.make_shards pairs.csv $PSDCLIP_DATA_ROOT/mine --image-column path --caption-column text
    python -m psdclip.data.make_shards pairs.parquet $PSDCLIP_DATA_ROOT/mine

A folder is searched recursively for images whose caption sits in a file of the same stem (``.txt``, or a ``.json``
with a ``caption`` field). CSV/TSV/Parquet tables name the image path (relative paths are taken from the table's
folder) and the caption. Each sample gets ``<key>.<jpg|png|webp>``, ``<key>.txt`` and ``<key>.json`` (key, caption,
source path, width, height). JPEG, PNG and WebP files are stored byte for byte; other formats are re-encoded as JPEG.
Images that do not open and empty captions are skipped and counted; the summary says how many.
"""

import argparse
import csv
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from psdclip.data.writer import encode_image, shard_pattern, write_shards

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def folder_pairs(folder: Path) -> Iterator[tuple[Path, str | None]]:
    """(image, caption) for every image under ``folder``; the caption from ``<stem>.txt`` or ``<stem>.json``."""
    for image in sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES):
        text, meta = image.with_suffix(".txt"), image.with_suffix(".json")
        if text.is_file():
            yield image, text.read_text(encoding="utf-8", errors="replace")
        elif meta.is_file():
            yield image, json.loads(meta.read_text()).get("caption")
        else:
            yield image, None


def table_pairs(table: Path, image_column: str, caption_column: str) -> Iterator[tuple[Path, str | None]]:
    """(image, caption) for every row of a CSV/TSV or Parquet table."""
    if table.suffix.lower() == ".parquet":
        try:
            import pandas as pd

            rows = pd.read_parquet(table).to_dict("records")
        except ImportError as exn:
            raise SystemExit(f"reading {table} needs pandas and pyarrow: pip install pandas pyarrow ({exn})")
    else:
        with open(table, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if table.suffix.lower() == ".tsv" else ","))
    if rows and (image_column not in rows[0] or caption_column not in rows[0]):
        raise SystemExit(f"{table} has columns {list(rows[0])}; choose --image-column and --caption-column among them")
    for row in rows:
        path = Path(str(row[image_column]))
        caption = row[caption_column]
        yield (path if path.is_absolute() else table.parent / path), (caption if isinstance(caption, str) else None)


def samples(pairs: Iterator[tuple[Path, str | None]], skipped: Counter) -> Iterator[dict]:
    for index, (path, caption) in enumerate(pairs):
        caption = (caption or "").strip()
        if not caption:
            skipped["empty or missing caption"] += 1
            log.warning("skipping %s: no caption", path)
            continue
        try:
            data = path.read_bytes()
            with Image.open(path) as image:
                image.load()
                extension = KEPT_FORMATS.get(image.format)
                size = image.size
                if extension is None:
                    data, extension = encode_image(image.convert("RGB"), "jpg"), "jpg"
        except Exception as exn:  # missing file, unknown format, truncated bytes
            skipped["unreadable image"] += 1
            log.warning("skipping %s: %r", path, exn)
            continue
        key = f"{index:09d}"
        meta = {"key": key, "caption": caption, "source": str(path), "width": size[0], "height": size[1]}
        yield {"__key__": key, extension: data, "txt": caption, "json": json.dumps(meta)}


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(prog="python -m psdclip.data.make_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="folder of images with captions, or a .csv/.tsv/.parquet table")
    parser.add_argument("out_dir", type=Path, help="folder for the shards and sizes.json")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard (img2dataset's default)")
    parser.add_argument("--prefix", default="", help="shard file name prefix")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="caption")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.source.is_dir():
        pairs = folder_pairs(args.source)
    elif args.source.is_file():
        pairs = table_pairs(args.source, args.image_column, args.caption_column)
    else:
        raise SystemExit(f"{args.source} is neither a folder nor a table file")
    skipped: Counter = Counter()
    sizes = write_shards(samples(pairs, skipped), args.out_dir, prefix=args.prefix, shard_size=args.shard_size)
    written = sum(sizes.values())
    if not written:
        raise SystemExit(f"no usable image–caption pair found in {args.source} (skipped: {dict(skipped) or 'none'})")
    print(f"wrote {written} samples in {len(sizes)} shards: {shard_pattern(args.out_dir, args.prefix, sizes)}")
    if skipped:
        print("skipped: " + ", ".join(f"{count} {reason}" for reason, count in skipped.items()))
    return sizes


if __name__ == "__main__":
    main()
