"""Write image–caption pairs as webdataset shards in img2dataset's layout, with a ``sizes.json`` beside them."""

import glob
import io
import json
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from PIL import Image

SIZES_FILE = "sizes.json"


def encode_image(image: Image.Image, fmt: str = "png") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt.upper().replace("JPG", "JPEG"))
    return buffer.getvalue()


def write_shards(
    samples: Iterable[dict], out_dir: str | Path, prefix: str = "", shard_size: int = 5000, first_shard: int = 0
) -> dict[str, int]:
    """Write ``samples`` (webdataset dicts with ``__key__``) to ``out_dir/{prefix}{000000..}.tar``, numbered from
    ``first_shard``.

    Returns the sample count of every shard written and adds them to ``sizes.json``; the shard files are written
    under a temporary name and renamed when complete, so an interrupted run never leaves a truncated shard behind.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    shard, count, sink, tmp_path = first_shard, 0, None, None

    def close():
        if sink is not None:
            sink.close()
            name = f"{prefix}{shard:06d}.tar"
            tmp_path.rename(out_dir / name)
            sizes[name] = count

    try:
        for sample in samples:
            if sink is None or count == shard_size:
                if sink is not None:
                    close()
                    shard += 1
                tmp_path = out_dir / f".{prefix}{shard:06d}.tar.tmp"
                sink, count = wds.TarWriter(str(tmp_path)), 0
            sink.write(sample)
            count += 1
    except BaseException:
        if sink is not None:
            sink.close()
            tmp_path.unlink(missing_ok=True)
        raise
    close()
    sizes_path = out_dir / SIZES_FILE
    merged = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
    merged.update(sizes)
    sizes_path.write_text(json.dumps(merged, indent=1))
    return sizes


def shard_numbers(out_dir: str | Path, prefix: str = "") -> list[int]:
    """The numbers of the shards named ``{prefix}NNNNNN.tar`` in ``out_dir``, as ``write_shards`` names them."""
    names = (path.name for path in Path(out_dir).glob(f"{glob.escape(prefix)}*.tar"))
    return sorted(
        int(digits) for name in names if len(digits := name[len(prefix) : -len(".tar")]) == 6 and digits.isdigit()
    )


def shard_pattern(out_dir: str | Path, prefix: str, last: int) -> str:
    """The brace pattern naming shards 0 … ``last`` that ``write_shards`` wrote with ``prefix``."""
    return str(Path(out_dir) / f"{prefix}{{000000..{last:06d}}}.tar")
