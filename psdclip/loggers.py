"""Loggers with run metadata filled in from the Hydra job: W&B runs named and grouped by their sweep."""

import logging
import subprocess
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

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


def hydra_job() -> tuple[str | None, str | None]:
    """(sweep group, run name) of the current Hydra job: the group names the multirun folder, the name the job's overrides."""
    if not HydraConfig.initialized():
        return None, None
    hydra = HydraConfig.get()
    name = hydra.job.override_dirname or None
    if hydra.mode != RunMode.MULTIRUN:
        return None, name
    return f"{hydra.job.name}-{Path(hydra.sweep.dir).name}", name or f"job{hydra.job.num}"


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger; ``group`` and ``name`` default to the Hydra sweep and the job's overrides.

    The W&B run is finished when training ends, so the next job of a Hydra multirun (same process) starts its own.
    """

    def __init__(self, group: str | None = None, name: str | None = None, **kwargs):
        sweep_group, job_name = hydra_job()
        super().__init__(group=group or sweep_group, name=name or job_name, **kwargs)

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None
