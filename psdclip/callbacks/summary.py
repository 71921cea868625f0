"""The Hydra callback that tabulates the run summaries (``psdclip.run.summary``) after a multirun."""

import json
import logging
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from psdclip.run.jobs import FAILURE_FILE
from psdclip.run.summary import SUMMARY_FILE, find_summary, format_table

log = logging.getLogger(__name__)


class MultirunSummary(Callback):
    """After ``python train.py -m ...``, print every job's summary as one table and a line for each job that failed
    (``psdclip.run.jobs``); save both as summary.json, the failed jobs with ``"status": "failed"``."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summaries = (find_summary(job) for job in sorted(sweep_dir.iterdir()) if job.is_dir())
        rows = [json.loads(path.read_text()) for path in summaries if path is not None]
        failed = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob(f"*/{FAILURE_FILE}"))]
        if not rows and not failed:
            log.warning("no run summaries found under %s", sweep_dir)
            return
        (sweep_dir / SUMMARY_FILE).write_text(json.dumps(rows + failed, indent=1))
        counts = f"{len(rows)} runs" + (f", {len(failed)} failed" if failed else "")
        lines = [f"\nMultirun summary ({counts}, {sweep_dir / SUMMARY_FILE}):", format_table(rows) if rows else ""]
        shared = shared_overrides(sweep_dir)
        for job in failed:
            chosen = " ".join(override for override in job["overrides"] if override not in shared)
            lines.append(f"failed: {job['output_dir']} ({chosen}): {job['error']}")
        print("\n".join(lines))


def shared_overrides(sweep_dir: Path) -> set[str]:
    """The overrides every job of the sweep was given: what is left of a job's tells it apart."""
    jobs = [set(yaml.safe_load(path.read_text())) for path in sweep_dir.glob("*/.hydra/overrides.yaml")]
    return set.intersection(*jobs) if len(jobs) > 1 else set()
