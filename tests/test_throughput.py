"""samples/s are measured between logging steps: the device is waited for only there, not after every batch."""

import torch
from torch.utils.data import DataLoader

from psdclip.callbacks.throughput import StepThroughput
from tests.helpers.trainers import quiet_trainer
from tests.test_scale_nonfinite import Toy


class CountingThroughput(StepThroughput):
    waits = 0

    def device_time(self, trainer) -> float:
        self.waits += 1
        return super().device_time(trainer)


def test_throughput_waits_for_the_device_only_at_logging_steps():
    monitor = CountingThroughput(batch_size_fn=len)
    trainer = quiet_trainer(max_steps=9, log_every_n_steps=3, callbacks=[monitor])
    trainer.fit(Toy(bad=set()), train_dataloaders=DataLoader(torch.ones(12, 4), batch_size=4))
    assert monitor.waits == 1 + 3  # the start, then steps 3, 6 and 9
    rate = trainer.callback_metrics["train/device/samples_per_sec"]
    assert rate > 0 and trainer.callback_metrics["train/device/batches_per_sec"] == rate / 4
