"""Loggers with run metadata filled in from the Hydra job: W&B runs named and grouped by their sweep, logged offline
when the W&B server cannot be reached."""

import logging
import os
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from psdclip.run.jobs import hydra_job

log = logging.getLogger(__name__)


def git_state(folder: str | Path = Path(__file__).parent) -> dict[str, str | bool]:
    """Commit and dirtiness of the git checkout holding ``folder`` (this package's code); empty outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=folder, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def wandb_server_problem(timeout: float) -> str | None:
    """Why the W&B server (``WANDB_BASE_URL``, else wandb.ai) cannot be reached, or None if it accepts a connection
    within ``timeout`` seconds. Online, wandb.init would otherwise retry for minutes and then fail the run."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exn:
        return f"{url.scheme}://{url.hostname}:{port} unreachable: {exn.strerror or exn!r}"
    return None


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger; ``group`` and ``name`` default to the Hydra sweep and the job's overrides.

    Online, the server is tried once at start-up (``connect_timeout`` seconds): when it cannot be reached the run logs
    offline instead, with one line saying how to upload it later, rather than hanging and then failing.
    The W&B run is finished when training ends, so the next job of a Hydra multirun (same process) starts its own.
    """

    def __init__(
        self,
        group: str | None = None,
        name: str | None = None,
        offline: bool = False,
        connect_timeout: float = 10.0,
        save_dir: str = ".",
        **kwargs,
    ):
        sweep_group, job_name = hydra_job()
        online = not offline and os.environ.get("WANDB_MODE", "online") not in ("offline", "dryrun", "disabled")
        # only rank 0 logs to W&B (Lightning's logger is rank-zero only)
        if online and rank_zero_only.rank == 0 and (problem := wandb_server_problem(connect_timeout)) is not None:
            offline = True
            kwargs["log_model"] = False  # checkpoints cannot be uploaded offline (Lightning refuses both together)
            offline_runs = Path(save_dir, "wandb", "offline-run-*")
            log.warning(
                "W&B server %s; logging offline instead: upload later with `wandb sync %s`", problem, offline_runs
            )
        super().__init__(
            group=group or sweep_group, name=name or job_name, offline=offline, save_dir=save_dir, **kwargs
        )

    def finalize(self, status: str) -> None:
        super().finalize(status)
        import wandb  # here, not at the top: it takes seconds to load, and runs without logger=wandb never need it

        if wandb.run is not None:
            wandb.finish(exit_code=0 if status == "success" else 1)
