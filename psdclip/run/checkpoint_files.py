"""Checkpoint files: atomic writes and safe loads (``AtomicCheckpointIO``, Lightning's ``CheckpointIO`` plugin), telling
a complete checkpoint from a cut-off one, clearing dead writes' leftovers, and what ``ckpt_path=last`` (or a requeued
SLURM job) resumes from.

A checkpoint is data, never code: every load goes through ``load_checkpoint_file`` (or the plugin, for Lightning's
resume), which uses torch's ``weights_only`` unpickler. psdclip's checkpoints hold only tensors and plain Python types,
so no global needs allowing; a file that asks for anything else is refused with one line.
"""

import contextlib
import errno
import io
import logging
import os
import pickle
import re
import shutil
import socket
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from psdclip.run.stopping import slurm_job_id, slurm_requeued_run_folders

log = logging.getLogger(__name__)

LAST = "last.ckpt"
# the temporary file of a write in progress: `.<name>.<pid>@<host>.partial` (older runs wrote no `@<host>`)
PARTIAL = re.compile(r"^\..+\.(?P<pid>\d+)(?:@(?P<host>.+))?\.partial$")


class IncompleteCheckpointError(ValueError):
    """A checkpoint file that torch cannot read back (truncated or corrupt)."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that torch's ``weights_only`` unpickler refuses: a pickle that would run code, or a format
    that holds more than tensors and plain types."""


class DiskFullError(OSError):
    """A checkpoint write that ran out of space (or quota); its message says where and what is left."""


def disk_full(path: Path, exn: OSError) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    previous = f"the previous {path.name} is intact" if path.is_file() else f"no earlier {path.name} exists"
    return DiskFullError(
        exn.errno,
        f"disk full: writing the checkpoint {path} failed ({exn.strerror}; {free} in {path.parent}); {previous} and "
        "no partial file is left. Free space there (or move paths.log_dir), then resume with ckpt_path=last",
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, then renames it into place.

    A crash or a full disk mid-write leaves the previous ``last.ckpt`` untouched (rename is atomic on POSIX). The
    temporary file lies on the checkpoint's own disk (Lightning's writer stages it in the system's temporary folder,
    often a small or RAM-backed /tmp on compute nodes, and copies it over), and a full disk stops the run with a
    ``DiskFullError`` that says where.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)  # object stores: uploads are atomic
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # named after its writer, so a later start-up can tell a dead write's leftover from a live one
        partial = path.with_name(f".{path.name}.{os.getpid()}@{socket.gethostname()}.partial")
        try:
            self.write(checkpoint, partial)
            os.replace(partial, path)
        except OSError as exn:
            partial.unlink(missing_ok=True)  # before the message measures the free space
            if exn.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(path, exn) from exn
            raise
        finally:
            partial.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load (local or fsspec) as data: ``weights_only`` whatever the caller asks, a refusal in one line."""
        with refused_as_unsafe(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def write(self, checkpoint: dict[str, Any], path: Path) -> None:
        """``checkpoint`` into the file ``path``, on disk when this returns."""
        serialised = io.BytesIO()
        torch.save(checkpoint, serialised)  # in memory first, as Lightning does: a full disk is then a plain OSError
        with open(path, "wb") as file:
            file.write(serialised.getbuffer())
            file.flush()
            os.fsync(file.fileno())  # before the rename makes it last.ckpt: a power cut cannot leave an empty one


@contextlib.contextmanager
def refused_as_unsafe(path: str | Path) -> Iterator[None]:
    """Turn the ``weights_only`` unpickler's refusal of ``path`` (a page of advice to load it unsafely) into an
    ``UnsafeCheckpointError`` of one line."""
    try:
        yield
    except pickle.UnpicklingError as exn:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exn))
        reason = f"its pickle calls {found[1]}" if found else str(exn).strip().splitlines()[-1][:200]
        raise UnsafeCheckpointError(
            f"{path} is not a checkpoint psdclip can load safely ({reason}, which torch's weights_only loader "
            "refuses); a psdclip checkpoint holds only tensors and plain types: load checkpoints that psdclip wrote"
        ) from None


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """The content of the complete checkpoint file ``path``, on the CPU, loaded as data (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    check_complete(path)  # a truncated file: its name and the newest good one beside it, not torch's zip error
    with refused_as_unsafe(path):
        return torch.load(path, map_location="cpu", weights_only=True)


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a whole torch checkpoint: a zip archive whose directory (written last) lists the pickle.

    Reads only the archive's directory, so it is cheap for large checkpoints; truncated files fail it.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def newest_complete(paths: Iterable[Path]) -> Path | None:
    """The most recently written complete checkpoint among ``paths`` (incomplete ones are skipped with a warning)."""
    for path in sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True):
        if is_complete(path):
            return path
        log.warning("skipping %s: not a complete checkpoint (truncated or corrupt)", path)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete partial checkpoint files whose writer, a process of this host, is gone (killed mid-write)."""
    host, removed = socket.gethostname(), []
    for path in folder.glob(".*.partial"):
        match = PARTIAL.match(path.name)
        pid = int(match["pid"]) if match else 0
        # a write in progress (live writer) or one from another host is left alone
        if pid > 0 and (match["host"] or host) == host and not _alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.warning(
            "removed %d partial checkpoint file(s) of killed writes: %s", len(removed), ", ".join(map(str, removed))
        )
    return removed


def check_complete(path: Path, use: str = "use it instead") -> None:
    """Raise ``IncompleteCheckpointError`` naming ``path`` and the newest complete checkpoint beside it, if any
    (``use``, formatted with its path, says what to do with it)."""
    if is_complete(path):
        return
    good = newest_complete(p for p in path.parent.glob("*.ckpt") if p != path)
    offer = (
        f"the newest complete checkpoint beside it is {good}: {use.format(good)}"
        if good
        else "no complete checkpoint lies beside it"
    )
    raise IncompleteCheckpointError(
        f"{path} is not a complete checkpoint (truncated or corrupt; torch fails with 'PytorchStreamReader failed'); "
        f"{offer}"
    )


def resolve_ckpt_path(ckpt_path: str | None, log_dir: str, task_name: str) -> str | None:
    """``last`` → the newest complete checkpoint (``last.ckpt`` or a step file) under ``<log_dir>/<task_name>/``
    (single runs and sweeps); a path is checked to be a complete checkpoint. Stale partial files are removed.
    Without a path, a requeued SLURM job resumes from the newest complete checkpoint of its earlier starts."""
    if ckpt_path is None:
        return requeued_checkpoint(log_dir, task_name)
    if ckpt_path != "last":
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} is not a file")
        remove_stale_partials(path.parent)
        check_complete(path, use="resume with ckpt_path={}")
        return ckpt_path
    root = Path(log_dir, task_name)
    for folder in root.glob("**/checkpoints"):
        remove_stale_partials(folder)
    # a write killed midway leaves the previous last.ckpt behind, older than the step file written just before it
    newest = newest_complete(root.glob("**/checkpoints/*.ckpt"))
    if newest is None:
        raise FileNotFoundError(
            f"ckpt_path=last: no {LAST} or other complete checkpoint under {root}; give the checkpoint's path instead"
        )
    log.info("ckpt_path=last resolves to %s", newest)
    return str(newest)


def requeued_checkpoint(log_dir: str, task_name: str) -> str | None:
    """The newest complete checkpoint that earlier starts of this SLURM job wrote, where this start is a requeued one
    (by ``scontrol requeue`` on the warning signal, or by SLURM after a node failure); else None."""
    folders = slurm_requeued_run_folders(log_dir, task_name)
    if not folders:
        return None
    newest = newest_complete(path for folder in folders for path in Path(folder, "checkpoints").glob("*.ckpt"))
    if newest is None:
        log.warning(
            "requeued SLURM job %s: its earlier starts left no complete checkpoint; starting anew", slurm_job_id()
        )
        return None
    log.info("requeued SLURM job %s resumes from %s", slurm_job_id(), newest)
    return str(newest)
