"""Where training shards live and how many samples each holds.

A source is one dataset of shards: a brace pattern, a glob, a folder of ``.tar`` files, a list of these, or any URL
webdataset opens (``pipe:…``, ``http(s)://…``) or fsspec knows (``s3://…``). Sample counts per shard come from a size
file beside local shards — ``sizes.json`` ({shard name: count}), ``_info.json`` (a shard index with ``shardlist``
entries of ``url``/``nsamples``, or ``shard_counts``) or img2dataset's ``<shard>_stats.json`` (``successes``) — or,
failing those, from a total ``num_samples`` given in the config and spread evenly over the shards.
"""

import glob
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from psdclip.data.writer import SIZES_FILE

log = logging.getLogger(__name__)

INFO_FILE = "_info.json"


def read_lines(path: str | Path) -> list[str]:
    """The non-blank lines of a text file (class names, caption or prompt templates), stripped; a missing or empty
    file stops with its path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"text file is empty: {path}")
    return lines


@dataclass(frozen=True)
class ShardSource:
    """One dataset in the training stream; ``upsample`` multiplies how often its samples are drawn in a mixture."""

    urls: str | list[str]
    upsample: float = 1.0
    num_samples: int | None = None  # total over the shards, used only where no size file lists them
    name: str = "train"


@dataclass(frozen=True)
class Shard:
    url: str
    size: int  # samples in the shard (exact from a size file, else an even share of the source's num_samples)
    source: int  # index of its ShardSource
    listed: bool = True  # the size comes from a size file, so a tar that disagrees is worth a warning


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Shard URLs named by a pattern or list of patterns: braces, ``::`` lists, local globs and local folders."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    shards = []
    for pattern in patterns:
        for url in wds.shardlists.expand_urls(str(pattern)):
            if is_local(url) and Path(url).is_dir():
                shards += sorted(str(path) for path in Path(url).glob("*.tar"))
            elif is_local(url) and glob.has_magic(url):
                shards += sorted(glob.glob(url))
            else:
                shards.append(url)
    if not shards:
        raise ValueError(f"shard pattern {urls!r} names no shards (an empty folder or a glob matching nothing?)")
    return shards


def parse_sources(train_shards) -> list[ShardSource]:
    """``train_shards`` as sources: a pattern or list of patterns is one source; a mapping ``name → pattern`` or
    ``name → {urls, upsample, num_samples}`` is a mixture."""
    if isinstance(train_shards, str) or not isinstance(train_shards, Mapping):
        return [ShardSource(train_shards if isinstance(train_shards, str) else list(train_shards))]
    sources = []
    for name, spec in train_shards.items():
        spec = {"urls": spec} if isinstance(spec, str) else dict(spec)
        if isinstance(spec["urls"], Sequence) and not isinstance(spec["urls"], str):
            spec["urls"] = list(spec["urls"])
        sources.append(ShardSource(name=str(name), **spec))
    if not sources:
        raise ValueError("data.train_shards is an empty mapping; name at least one source")
    return sources


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exn:
        log.warning("ignoring unreadable size file %s: %r", path, exn)
        return {}


def _sizes_in_folder(folder: Path) -> dict[str, int]:
    """Shard name → sample count from the size files in one folder (sizes.json wins over _info.json)."""
    sizes: dict[str, int] = {}
    info = _read_json(folder / INFO_FILE) if (folder / INFO_FILE).is_file() else {}
    sizes.update({Path(entry["url"]).name: int(entry["nsamples"]) for entry in info.get("shardlist", [])})
    sizes.update({Path(name).name: int(count) for name, count in info.get("shard_counts", {}).items()})
    if (folder / SIZES_FILE).is_file():
        sizes.update({name: int(count) for name, count in _read_json(folder / SIZES_FILE).items()})
    return sizes


def local_shard_sizes(urls: list[str]) -> dict[str, int]:
    """Sample counts of the local shards that a size file lists."""
    folders: dict[Path, dict[str, int]] = {}
    sizes = {}
    for url in urls:
        if not is_local(url):
            continue
        path = Path(url)
        if path.parent not in folders:
            folders[path.parent] = _sizes_in_folder(path.parent)
        if path.name in folders[path.parent]:
            sizes[url] = folders[path.parent][path.name]
            continue
        stats = path.with_name(path.name.removesuffix(".tar") + "_stats.json")  # img2dataset writes one per shard
        if stats.is_file() and "successes" in (entry := _read_json(stats)):
            sizes[url] = int(entry["successes"])
    return sizes


def resolve(sources: list[ShardSource]) -> tuple[list[Shard], list[str]]:
    """Every shard with its size, and the local shards that the patterns name but the disk lacks.

    Missing shards are left out with a warning (the caller counts them); a source with none present, or with
    shards of unknown size and no ``num_samples``, stops here with a message saying what to set.
    """
    shards, missing = [], []
    for index, source in enumerate(sources):
        if source.upsample < 0:
            raise ValueError(f"source {source.name!r}: upsample must be >= 0, got {source.upsample}")
        urls = expand_shards(source.urls)
        absent = [url for url in urls if is_local(url) and not Path(url).is_file()]
        urls = [url for url in urls if url not in set(absent)]
        if not urls:
            raise FileNotFoundError(
                f"source {source.name!r}: none of the {len(absent)} shards of {source.urls!r} exist, e.g. {absent[0]}"
            )
        if absent:
            log.warning(
                "source %r: %d of %d shards are missing and left out, e.g. %s",
                source.name,
                len(absent),
                len(absent) + len(urls),
                absent[0],
            )
        missing += absent
        sizes = local_shard_sizes(urls)
        listed = len(sizes) == len(urls)
        if not listed:
            if source.num_samples is None:
                unknown = next(url for url in urls if url not in sizes)
                raise ValueError(
                    f"source {source.name!r}: no size file (sizes.json, _info.json, <shard>_stats.json) lists "
                    f"{len(urls) - len(sizes)} of its {len(urls)} shards, e.g. {unknown}; set its num_samples "
                    "(data.train_num_samples for a single source) or write sizes.json"
                )
            share, extra = divmod(source.num_samples, len(urls))
            sizes = {url: share + (i < extra) for i, url in enumerate(urls)}
            log.info(
                "source %r: no size file, assuming %d samples spread evenly over %d shards",
                source.name,
                source.num_samples,
                len(urls),
            )
        shards += [Shard(url, sizes[url], index, listed=listed) for url in urls]
    return shards, missing
