"""One-line run summaries: printed and written as JSON after each run; tabulated after a Hydra multirun."""

import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from psdclip.tables import text_table

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
COLUMNS = ("method", "alpha_max", "noise", "zeroshot_top1", "wall_time_s")


def format_table(rows: list[dict]) -> str:
    """A plain-text table of run summaries, one row per run."""
    columns = [c for c in COLUMNS if any(c in row for row in rows)] + ["output_dir"]
    return text_table(columns, ([row.get(c) for c in columns] for row in rows))


class MultirunSummary(Callback):
    """After ``python train.py -m ...``, print every job's summary as one table and save it as summary.json."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob(f"*/**/{SUMMARY_FILE}"))]
        if not rows:
            log.warning("no run summaries found under %s", sweep_dir)
            return
        (sweep_dir / SUMMARY_FILE).write_text(json.dumps(rows, indent=1))
        print(f"\nMultirun summary ({len(rows)} runs, {sweep_dir / SUMMARY_FILE}):\n{format_table(rows)}")
