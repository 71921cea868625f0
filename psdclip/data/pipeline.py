"""webdataset stages that turn tar shards of image–caption pairs into batches of (image tensor, tokens)."""

import json
import logging
from collections.abc import Callable
from pathlib import Path

import webdataset as wds

from psdclip.data.writer import SIZES_FILE

log = logging.getLogger(__name__)


def expand_shards(urls: str | list[str]) -> list[str]:
    """Brace-expand one pattern or a list of patterns; local shards must exist."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    shards = [shard for pattern in patterns for shard in wds.shardlists.expand_urls(str(pattern))]
    if not shards:
        raise ValueError(f"shard pattern {urls!r} names no shards")
    missing = [shard for shard in shards if _is_local(shard) and not Path(shard).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards not found, e.g. {missing[0]} (from {urls!r})")
    return shards


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def count_samples(shards: list[str]) -> int | None:
    """Total samples from the ``sizes.json`` next to local shards, or None when any shard is not listed."""
    total, cache = 0, {}
    for shard in shards:
        if not _is_local(shard):
            return None
        path = Path(shard)
        sizes_path = path.parent / SIZES_FILE
        if sizes_path not in cache:
            cache[sizes_path] = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
        if path.name not in cache[sizes_path]:
            return None
        total += cache[sizes_path][path.name]
    return total


def warn_and_continue(exn: Exception) -> bool:
    log.warning("skipping bad sample or shard: %r", exn)
    return True


def make_caption_tokenizer(tokenizer: Callable) -> Callable:
    return lambda caption: tokenizer([caption])[0]


def image_text_pipeline(
    shards: list[str],
    transform: Callable,
    tokenizer: Callable,
    batch_size: int,
    *,
    image_key: str = "jpg;jpeg;png;webp",
    text_key: str = "txt",
    shuffle: bool = False,
    seed: int = 0,
    start_epoch: int = 0,
    shuffle_buffer: int = 2000,
    drop_last: bool = False,
) -> wds.DataPipeline:
    """Stream (image, tokens) batches; with ``shuffle`` the shard order and sample buffer are seeded by seed + epoch.

    The epoch advances each time the pipeline is iterated, which a persistent DataLoader worker does once per epoch.
    """
    stages = [wds.SimpleShardList(shards)]
    if shuffle:
        stages.append(wds.detshuffle(bufsize=len(shards), initial=len(shards), seed=seed, epoch=start_epoch - 1))
    stages += [wds.split_by_node, wds.split_by_worker, wds.tarfile_to_samples(handler=warn_and_continue)]
    if shuffle:
        stages.append(wds.detshuffle(bufsize=shuffle_buffer, initial=shuffle_buffer // 4, seed=seed, epoch=start_epoch - 1))
    stages += [
        wds.decode("pilrgb", handler=warn_and_continue),
        wds.to_tuple(image_key, text_key, handler=warn_and_continue),
        wds.map_tuple(transform, make_caption_tokenizer(tokenizer), handler=warn_and_continue),
        wds.batched(batch_size, partial=not drop_last),
    ]
    return wds.DataPipeline(*stages)
