"""Tiny image–caption shard sets for the data tests: sample ``i`` has caption ``"sample i"``, so the tokens the
test tokenizer makes from it give back ``i``."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from psdclip.data.samples import SkipWarnings
from psdclip.data.writer import write_shards


def jpeg(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def sample(i: int, **fields) -> dict:
    return {"__key__": f"{i:09d}", "jpg": jpeg(i), "txt": f"sample {i}", **fields}


def write_set(folder: Path, sizes: list[int], first_id: int = 0, prefix: str = "", undecodable=()) -> list[int]:
    """Shards of the given sizes (one write_shards call per shard so sizes may differ), the samples whose ids are in
    ``undecodable`` with a truncated image; returns the sample ids."""
    ids, next_id = [], first_id
    for index, size in enumerate(sizes):
        batch = [sample(i, jpg=jpeg(i)[:60]) if i in undecodable else sample(i) for i in range(next_id, next_id + size)]
        write_shards(batch, folder, prefix=f"{prefix}{index:03d}-", shard_size=size)
        ids += range(next_id, next_id + size)
        next_id += size
    return ids


def ids_of(tokens: torch.Tensor) -> list[int]:
    return tokens[:, 0].tolist()


def tokenizer(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[int(caption.split()[-1])] for caption in captions])


def transform(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32)).permute(2, 0, 1)


def run_rank(stream, workers: int = 2) -> tuple[list[list[int]], np.ndarray]:
    """Sample ids of each batch one rank's DataLoader yields, and the skip counts the batches carried (their notes
    warned about as the DataModule does)."""
    batches, counts, warnings = [], 0, SkipWarnings()
    for images, tokens, skips, *_ in DataLoader(stream, batch_size=None, num_workers=workers):
        assert images.shape[0] == tokens.shape[0]
        batches.append(ids_of(tokens))
        counts = counts + skips.counts.numpy()
        warnings.warn(skips.notes)
    return batches, counts


def truncate_tar_inside(path: Path, member_index: int) -> None:
    """Cut a tar in the middle of the data of its ``member_index``-th file."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[member_index]
    data = path.read_bytes()
    path.write_bytes(data[: member.offset_data + member.size // 2])


def write_raw_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def set_size(folder: Path, name: str, count: int) -> None:
    sizes_path = folder / "sizes.json"
    sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
    sizes[name] = count
    sizes_path.write_text(json.dumps(sizes))


def write_bad_set(folder):
    """64 listed samples in 8 shards of 8, with every kind of bad data; returns (usable ids, expected counts)."""
    ids = write_set(folder, [8] * 8)
    bad = {  # replace samples of shard 0 and 1 by broken ones
        0: sample(0, jpg=jpeg(0)[:60]),  # truncated jpeg
        1: sample(1, jpg=b"not an image at all"),
        2: {"__key__": f"{2:09d}", "txt": "sample 2"},  # no image
        3: {"__key__": f"{3:09d}", "jpg": jpeg(3)},  # no caption
        4: sample(4, txt="   "),
        5: sample(5, txt=b"sample \xff\xfe 5"),
    }
    shard0 = folder / "000-000000.tar"
    write_raw_tar(
        shard0,
        {
            f"{s['__key__']}.{ext}": (v if isinstance(v, bytes) else v.encode())
            for i in range(8)
            for s in [bad.get(i, sample(i))]
            for ext, v in s.items()
            if ext != "__key__"
        },
    )
    (folder / "001-000000.tar").write_bytes(b"")  # zero-byte shard, sizes.json still says 8
    truncate_tar_inside(folder / "002-000000.tar", member_index=6)  # breaks in sample 3's image: 3 whole samples
    set_size(folder, "008-000000.tar", 8)  # listed, named by the pattern, absent on disk
    usable = [i for i in ids if i not in bad and not 8 <= i < 16 and not 19 <= i < 24]
    counts = {
        "image_undecodable": 2,
        "image_missing": 1,
        "caption_missing": 1,
        "caption_empty": 1,
        "caption_not_utf8": 1,
        "shard_unreadable": 1,
        "shard_truncated": 1,
        "shard_missing": 1,
    }
    return usable, counts
