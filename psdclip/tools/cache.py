"""The embedded dataset's cached shards (one folder per split and data setting, e.g. each ``data.noise`` value):
``python -m psdclip.tools.cache`` lists them with their sizes, ``--clean`` deletes them (``make clean-cache``); a later run
writes again the ones it needs.

The cache folder is ``paths.cache_dir`` of ``conf/paths/default.yaml`` (``PSDCLIP_CACHE``, else
``~/.cache/psdclip``), or ``--cache-dir``. Only what psdclip writes there (``fashion_mnist/``, ``fashion_mosaic/``) is touched.
"""

import argparse
import shutil
from pathlib import Path

from omegaconf import OmegaConf

PATHS_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "paths" / "default.yaml"
CACHED = ("fashion_mnist", "fashion_mosaic")  # the folders psdclip.data.embedded and .mosaic write there


def default_cache_dir() -> Path:
    """``paths.cache_dir`` as ``train.py`` resolves it (environment variables included)."""
    return Path(OmegaConf.create({"paths": OmegaConf.load(PATHS_CONFIG)}).paths.cache_dir)


def size_of(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def cached_sets(cache_dir: Path) -> list[Path]:
    return sorted(path for name in CACHED if (cache_dir / name).is_dir() for path in (cache_dir / name).iterdir())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m psdclip.tools.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", action="store_true", help="delete the cached shards")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the cache folder (default: paths.cache_dir)")
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or default_cache_dir()
    sets = cached_sets(cache_dir)
    sizes = {path: size_of(path) for path in sets}
    for path in sets:
        print(f"{sizes[path] / 1e6:9.1f} MB  {path}")
    total = sum(sizes.values()) / 1e6
    if not args.clean:
        print(f"{total:9.1f} MB in {len(sets)} cached shard set(s) under {cache_dir}; delete them with --clean")
        return
    for name in CACHED:
        shutil.rmtree(cache_dir / name, ignore_errors=True)
    print(f"deleted {len(sets)} cached shard set(s), {total:.1f} MB, under {cache_dir}")


if __name__ == "__main__":
    main()
