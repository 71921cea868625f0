"""A non-finite loss skips the step (weights and optimiser state untouched) and is counted; a streak stops the run."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from psdclip.callbacks.nonfinite import NonFiniteLossError, SkipNonFiniteLoss
from tests.helpers.trainers import quiet_trainer


class Toy(L.LightningModule):
    """A linear model whose loss is NaN at the steps listed in `bad`."""

    def __init__(self, bad: set[int]):
        super().__init__()
        self.layer, self.bad, self.snapshots = torch.nn.Linear(4, 1), bad, {}

    def training_step(self, batch, batch_idx):
        self.snapshots[self.global_step] = self.layer.weight.detach().clone()
        loss = self.layer(batch).pow(2).mean()
        return loss * float("nan") if self.global_step in self.bad else loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def fit(module: Toy, guard: SkipNonFiniteLoss, steps: int) -> L.Trainer:
    trainer = quiet_trainer(
        max_steps=steps,
        callbacks=[guard],
    )
    trainer.fit(module, train_dataloaders=DataLoader(torch.arange(1.0, 9.0)[:, None].expand(8, 4), batch_size=None))
    return trainer


def test_nonfinite_steps_are_skipped_and_counted():
    torch.manual_seed(0)
    module, guard = Toy(bad={2, 3}), SkipNonFiniteLoss(max_consecutive=3)
    trainer = fit(module, guard, steps=6)
    snaps = module.snapshots
    assert torch.equal(snaps[3], snaps[2]) and torch.equal(snaps[4], snaps[2])  # skipped: untouched
    assert not torch.equal(snaps[2], snaps[1]) and not torch.equal(snaps[5], snaps[4])  # good steps move
    assert guard.skipped == 2 and guard.consecutive == 0
    assert trainer.global_step == 6 and trainer.callback_metrics["train/nonfinite_steps"] == 2
    assert torch.isfinite(module.layer.weight).all()


def test_a_streak_of_nonfinite_losses_stops_with_the_step():
    module, guard = Toy(bad={1, 2, 3, 4}), SkipNonFiniteLoss(max_consecutive=3)
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row, the last at step 3.*Last checkpoint"):
        fit(module, guard, steps=8)


class CountingGuard(SkipNonFiniteLoss):
    """Counts the host's reads of the device marks."""

    checks = 0

    def check(self, trainer, pl_module) -> bool:
        self.checks += 1
        return super().check(trainer, pl_module)


class Moments(L.Callback):
    """AdamW's first moment of the layer's weight at the start of each step."""

    def __init__(self):
        self.at_step = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = trainer.optimizers[0].state.get(pl_module.layer.weight, {})
        self.at_step[trainer.global_step] = state["exp_avg"].clone() if "exp_avg" in state else None


def test_a_window_with_a_nonfinite_loss_is_undone_whole_and_read_once_per_window():
    torch.manual_seed(0)
    module, guard, moments = Toy(bad={4}), CountingGuard(max_consecutive=3, check_every_n_steps=3), Moments()
    trainer = quiet_trainer(max_steps=9, callbacks=[guard, moments])
    trainer.fit(module, train_dataloaders=DataLoader(torch.arange(1.0, 12.0)[:, None].expand(11, 4), batch_size=None))
    snaps = module.snapshots
    # steps 3-5 form the second window: undone, so step 6 starts from where step 3 did, weights and AdamW moments
    assert torch.equal(snaps[6], snaps[3]) and torch.equal(moments.at_step[6], moments.at_step[3])
    assert not torch.equal(snaps[4], snaps[3]) and not torch.equal(snaps[3], snaps[2])  # the steps did move, then
    assert not torch.equal(snaps[7], snaps[6]) and torch.isfinite(module.layer.weight).all()
    assert guard.checks == 3 and guard.skipped == 3 and guard.consecutive == 0  # one read per window of 3
    assert trainer.callback_metrics["train/nonfinite_steps"] == 3


def test_the_last_window_is_checked_when_the_run_ends_inside_it():
    module, guard = Toy(bad={4}), CountingGuard(check_every_n_steps=4)
    fit(module, guard, steps=6)  # windows 0-3 and 4-5: the second ends with the run
    assert guard.checks == 2 and guard.skipped == 2
    assert torch.isfinite(module.layer.weight).all()
