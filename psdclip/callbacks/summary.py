"""The Hydra callback that tabulates the run summaries (``psdclip.run.summary``) after a multirun."""

import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from psdclip.run.summary import SUMMARY_FILE, format_table

log = logging.getLogger(__name__)


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
