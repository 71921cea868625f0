"""The module's epoch metrics (``CountRatio``) against hand counts: in one process, summed over 2 gloo ranks, and
logged once per epoch by the module."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from psdclip.module import CountRatio
from tests.helpers.losses import EMA_OUTSCORED
from tests.helpers.one_step import Capture, global_batch, make_module
from tests.helpers.processes import free_port, join_ranks_as
from tests.helpers.trainers import quiet_trainer

RANK_COUNTS = [[(2, 5), (1, 3)], [(0, 4), (1, 4)]]  # each rank's (numerator, denominator) updates


def updated(counts) -> CountRatio:
    metric = CountRatio()
    for numerator, denominator in counts:
        metric.update(torch.tensor(numerator), torch.tensor(denominator))
    return metric


def test_count_ratio_divides_the_summed_counts():
    assert updated(RANK_COUNTS[0]).compute() == torch.tensor(3 / 8)
    assert updated([(0, 0), (0, 0)]).compute().isnan()  # nothing to divide: the module logs nothing
    metric = updated(RANK_COUNTS[0])
    metric.reset()
    metric.update(torch.tensor(1), torch.tensor(4))
    assert metric.compute() == torch.tensor(1 / 4)


def rank_worker(rank: int, port: int, out_dir: str) -> None:
    join_ranks_as(rank, len(RANK_COUNTS), port)
    dist.init_process_group("gloo")
    torch.save(updated(RANK_COUNTS[rank]).compute(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_count_ratio_sums_the_counts_of_every_rank(tmp_path):
    mp.start_processes(rank_worker, args=(free_port(), str(tmp_path)), nprocs=len(RANK_COUNTS), start_method="spawn")
    # (2 + 1 + 0 + 1) / (5 + 3 + 4 + 4) on every rank; the ranks' own ratios are 3/8 and 1/8
    for rank in range(len(RANK_COUNTS)):
        assert torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) == torch.tensor(4 / 16)


class EpochBatches:
    """A data loader of one batch per epoch: the given batches, one after the other."""

    def __init__(self, *batches):
        self.batches, self.epochs = batches, 0

    def __iter__(self):
        self.epochs += 1
        yield self.batches[self.epochs - 1]

    def __len__(self) -> int:
        return 1


def test_the_module_logs_each_epoch_s_own_diagnostics():
    first, second = global_batch(16, pair_info=True), global_batch(16, seed=2, pair_info=True)
    first = (*first[:2], torch.ones(16, dtype=torch.int8), *first[3:])  # every caption corrupted
    capture = Capture()
    trainer = quiet_trainer(max_epochs=2, callbacks=[capture], use_distributed_sampler=False)
    trainer.fit(make_module(EMA_OUTSCORED), train_dataloaders=EpochBatches(first, second))
    marks, chosen = second[2], capture.distill  # the second epoch's batch and D
    corrupted, marked = marks == 1, marks >= 0
    assert trainer.callback_metrics["train/batch_noise_epoch"] == corrupted.sum() / marked.sum()
    assert (
        trainer.callback_metrics["train/distill_precision_epoch"]
        == (chosen & corrupted).sum() / (chosen & marked).sum()
    )
    assert trainer.callback_metrics["train/distill_recall_epoch"] == (chosen & corrupted).sum() / corrupted.sum()
