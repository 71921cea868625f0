"""Read samples out of tar shards and decode them, skipping and counting every kind of bad data instead of failing."""

import importlib
import io
import itertools
import json
import logging
import tarfile
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from psdclip.data.plan import Segment
from psdclip.data.sources import is_local

log = logging.getLogger(__name__)
# the module, which webdataset's package namespace shadows with its gopen function
gopen = importlib.import_module("webdataset.gopen")

# what a skipped item was; a batch carries the counts since the previous batch in this order
SKIP_KINDS = (
    "shard_missing",  # named by the pattern, absent on disk (counted once, at start-up)
    "shard_unreadable",  # could not be opened or is not a tar (zero-byte files included)
    "shard_truncated",  # ended with a read error part-way
    "sample_absent",  # listed by the shard's size file, but the tar ends before it (img2dataset's empty tars)
    "shard_overfull",  # the tar holds more samples than its size file lists; those are never read (once per read)
    "image_missing",
    "image_undecodable",  # truncated or corrupt image bytes
    "caption_missing",  # no caption file, or no such field in the json
    "caption_empty",
    "caption_not_utf8",
    "transform_failed",
)
# refilled: samples read in place of skipped ones; excluded: left out on purpose (data.exclude_keys)
COUNTERS = SKIP_KINDS + ("refilled", "excluded")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class BadSample(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


class SkipCounter:
    """Counts skips by kind in one DataLoader worker, and notes the first skip of each kind per shard for the main
    process to warn about (``SkipWarnings``): workers are separate processes, so only there can a warning be given
    once per run rather than once per worker and epoch."""

    def __init__(self):
        self.counts = np.zeros(len(COUNTERS), dtype=np.int64)
        self.noted: set[tuple[str, str]] = set()
        self.notes: list[tuple[str, str, str]] = []

    def add(self, kind: str, url: str, detail: str = "", count: int = 1) -> None:
        self.counts[COUNTERS.index(kind)] += count
        if kind not in ("refilled", "excluded") and (url, kind) not in self.noted:
            self.noted.add((url, kind))
            self.notes.append((kind, url, detail))

    def take(self) -> "Skips":
        """The counts and notes since the last call, to travel with a batch."""
        skips = Skips(torch.from_numpy(self.counts), self.notes)
        self.counts, self.notes = np.zeros_like(self.counts), []
        return skips


class Skips(NamedTuple):
    """What a worker skipped since its previous batch: counts in ``COUNTERS`` order, and (kind, shard, detail) notes."""

    counts: torch.Tensor
    notes: list[tuple[str, str, str]]


class SkipWarnings:
    """Warns once per run about each (shard, kind) that workers noted, naming the shard."""

    def __init__(self):
        self.warned: set[tuple[str, str]] = set()

    def warn(self, notes) -> None:
        for kind, url, detail in notes:
            if (url, kind) not in self.warned:
                self.warned.add((url, kind))
                log.warning(
                    "skipping %s in shard %s (%s); further ones of this kind in this shard are counted only",
                    kind.replace("_", " "),
                    url,
                    detail,
                )


class Retries(NamedTuple):
    """How a remote shard (``pipe:``, ``http(s)://``, ``s3://``…) that fails before its first sample is tried again:
    ``attempts`` more times, waiting ``wait_s``, then twice, four times… as long before each (a flaky network or
    object store). Local files are not retried: what fails to open there fails again."""

    attempts: int = 0
    wait_s: float = 1.0

    def wait(self, attempt: int) -> float:
        return self.wait_s * 2**attempt


NO_RETRIES = Retries()


def ignore(kind: str, url: str, detail: str = "", count: int = 1) -> None:
    """Report function for reads whose skips another worker counts already."""


def open_shard(url: str):
    """A binary stream of ``url``: webdataset's gopen for files, ``pipe:`` and its schemes, else fsspec."""
    scheme = urlparse(url).scheme
    if scheme and scheme != "file" and scheme not in gopen.gopen_schemes and not url.startswith("pipe:"):
        import fsspec

        return fsspec.open(url, "rb").open()
    return gopen.gopen(url)


def shard_samples(
    url: str, skip: int, take: int, report: Callable, listed: int | None = None, retries: Retries = NO_RETRIES
) -> Iterator[dict]:
    """Samples ``skip`` … ``skip + take`` of a shard (files grouped by key as webdataset does); a remote shard that
    fails before its first sample is tried again as ``retries`` says; one that cannot be opened or breaks off is
    reported once, by the reader whose stretch the failure falls in. Where ``listed`` (the size file's count) is given,
    a tar that ends cleanly before it reports each absent sample of this stretch, and one that holds more reports that
    once, by the reader whose stretch ends at ``listed``."""
    end = skip + take
    for attempt in itertools.count():
        index, sample = 0, None  # index: of the sample being read
        try:
            stream = open_shard(url)
            try:
                for member in wds.tariterators.tar_file_iterator(stream):
                    key, extension = wds.tariterators.base_plus_ext(member["fname"])
                    if key is None:
                        continue
                    if sample is not None and (key != sample["__key__"] or extension.lower() in sample):
                        finished, sample, index = sample, None, index + 1
                        if index == listed == end:  # reported before the last yield: the consumer may stop after it
                            report(
                                "shard_overfull",
                                url,
                                f"the tar holds more than the {listed} samples its size file "
                                "lists; the rest are never read: correct the size file",
                            )
                        if index - 1 >= skip:
                            yield finished
                        if index >= end:
                            return
                    if sample is None:  # __index__: the sample's place in the shard, part of its identity
                        sample = {"__key__": key, "__url__": url, "__index__": index}
                    sample[extension.lower()] = member["data"]
            finally:
                stream.close()
        except (OSError, tarfile.TarError, ValueError) as exn:  # curl/pipe failures, bad tar headers, truncation
            nothing_read = index == 0 and sample is None
            if nothing_read and attempt < retries.attempts and not is_local(url):
                time.sleep(retries.wait(attempt))
                continue
            if skip <= index < end:
                kind = "shard_unreadable" if nothing_read else "shard_truncated"
                kind = "shard_missing" if isinstance(exn, FileNotFoundError) else kind
                tries = f" (tried {attempt + 1} times)" if attempt else ""
                report(kind, url, f"{exn!r} after {index} samples{tries}")
        else:
            held = index + (sample is not None)
            absent = min(end, listed if listed is not None else held) - max(skip, held)
            if absent > 0:
                report("sample_absent", url, f"the tar holds {held} samples, its size file lists {listed}", absent)
        break
    # the last sample, or the one being read when the shard broke off (decoding tells whether it is whole)
    if sample is not None and skip <= index < end:
        yield sample


def read_segments(
    urls: list[str], sizes: list[int], pieces: list[Segment], report: Callable, retries: Retries = NO_RETRIES
) -> Iterator[dict]:
    for piece in pieces:
        yield from shard_samples(urls[piece.shard], piece.skip, piece.take, report, sizes[piece.shard], retries)


def caption_of(sample: dict, text_key: str) -> str:
    """The caption under ``text_key``: a file extension (``txt``) or ``json:<field>[.<field>…]``."""
    extension, _, field = text_key.partition(":")
    if extension not in sample:
        raise BadSample("caption_missing", f"no .{extension} for {sample['__key__']}")
    try:
        text = sample[extension].decode("utf-8")
    except UnicodeDecodeError as exn:
        raise BadSample("caption_not_utf8", f"{sample['__key__']}.{extension}: {exn}") from None
    if field:
        try:
            value = json.loads(text)
            for part in field.split("."):
                value = value[part]
        except (ValueError, KeyError, TypeError, IndexError):
            raise BadSample("caption_missing", f"no field {field!r} in {sample['__key__']}.{extension}") from None
        text = value if isinstance(value, str) else ""
    if not text.strip():
        raise BadSample("caption_empty", f"{sample['__key__']}.{extension}")
    return text.strip()


def image_of(sample: dict, image_keys: tuple[str, ...]) -> Image.Image:
    extension = next((key for key in image_keys if key in sample), None)
    if extension is None:
        raise BadSample("image_missing", f"no {'/'.join(image_keys)} for {sample['__key__']}")
    try:
        with Image.open(io.BytesIO(sample[extension])) as image:
            return image.convert("RGB")  # forces the full decode, so truncation shows here
    except Exception as exn:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError …
        raise BadSample("image_undecodable", f"{sample['__key__']}.{extension}: {exn!r}") from None


def image_keys(spec: str) -> tuple[str, ...]:
    """``"jpg;png"`` → ("jpg", "png")."""
    return tuple(key.strip().lower() for key in spec.split(";") if key.strip())
