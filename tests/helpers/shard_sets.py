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

from psdclip.data.writer import write_shards


def jpeg(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def sample(i: int, **fields) -> dict:
    return {"__key__": f"{i:09d}", "jpg": jpeg(i), "txt": f"sample {i}", **fields}


def write_set(folder: Path, sizes: list[int], first_id: int = 0, prefix: str = "") -> list[int]:
    """Shards of the given sizes (one write_shards call per shard so sizes may differ); returns the sample ids."""
    ids, next_id = [], first_id
    for index, size in enumerate(sizes):
        batch = [sample(next_id + k) for k in range(size)]
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
    """Sample ids of each batch one rank's DataLoader yields, and the skip counts the batches carried."""
    batches, counts = [], 0
    for images, tokens, skipped in DataLoader(stream, batch_size=None, num_workers=workers):
        assert images.shape[0] == tokens.shape[0]
        batches.append(ids_of(tokens))
        counts = counts + skipped.numpy()
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
