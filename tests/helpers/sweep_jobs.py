"""Lightning callbacks for the sweep tests, added with ``+callbacks.<name>._target_=tests.helpers.sweep_jobs.<class>``:
one rank of one job fails on purpose; every rank notes which job it ran and its W&B group."""

import json
from pathlib import Path

import lightning as L

from psdclip.run.jobs import hydra_job


class FailOnRank(L.Callback):
    """Raises on rank ``rank`` after the first training step, when ``value`` reads as ``failing_value``: e.g. one job
    of a sweep, with ``+callbacks.fail_on_rank.value='${loss.alpha_max}' +callbacks.fail_on_rank.failing_value=0.5``
    (a quoted interpolation gives its value as text)."""

    def __init__(self, rank: int, value, failing_value):
        self.rank, self.fails = rank, str(value) == str(failing_value)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.fails and trainer.global_rank == self.rank:
            raise RuntimeError(f"rank {self.rank} fails on purpose (tests.helpers.sweep_jobs.FailOnRank)")


class NoteSweepJob(L.Callback):
    """Writes ``rank<R>.json`` into the run folder when training starts: the rank and world size, ``setting`` as this
    rank's config gives it (e.g. ``'${loss.alpha_max}'``, as text), the W&B group and run name psdclip gives the run, and on
    rank 0 the group of the W&B run itself."""

    def __init__(self, setting):
        self.setting = setting

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        import wandb

        group, name = hydra_job()
        note = {"world_size": trainer.world_size, "setting": self.setting, "group": group, "name": name}
        if wandb.run is not None:
            note["wandb_group"] = wandb.run.group
        Path(trainer.default_root_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(note))
