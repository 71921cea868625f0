"""The shard stream: exact epochs over 2 ranks × 2 workers, seeding, mixtures, bad data counted by kind, start-up errors."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from psdclip.callbacks.data_quality import DataQualityMonitor
from psdclip.data import ShardDataModule
from psdclip.data.pipeline import Decoded, EpochLoader, PairIds, distinct_batches
from psdclip.data.samples import COUNTERS
from tests.helpers.shard_sets import (
    ids_of,
    jpeg,
    run_rank,
    set_size,
    tokenizer,
    transform,
    write_bad_set,
    write_raw_tar,
    write_set,
)


def datamodule(shards, **kwargs) -> ShardDataModule:
    kwargs = {"batch_size": 8, "num_workers": 2, "shuffle_buffer": 16, "seed": 3, **kwargs}
    return ShardDataModule(shards, transform=transform, tokenizer=tokenizer, **kwargs)


def epoch_ids(dm: ShardDataModule, world_size: int = 2, epoch: int = 0) -> list[list[list[int]]]:
    """Per rank, the sample ids of every batch (2 DataLoader worker processes per rank)."""
    return [run_rank(dm.stream(rank, world_size, epoch))[0] for rank in range(world_size)]


def test_epoch_is_exact_across_ranks_and_workers_with_uneven_shards(tmp_path):
    ids = write_set(tmp_path, [7, 13, 12, 9, 15, 10, 18, 12])  # 96 = 2 ranks × 6 batches × 8
    dm = datamodule(str(tmp_path))
    assert dm.batches_per_epoch(world_size=2) == 6
    ranks = epoch_ids(dm)
    assert [len(batches) for batches in ranks] == [6, 6]
    assert all(len(batch) == 8 for batches in ranks for batch in batches)
    seen = [i for batches in ranks for batch in batches for i in batch]
    assert sorted(seen) == ids  # every sample once: none lost, none twice


@pytest.mark.parametrize("sizes", [[10] * 10, [100]], ids=["ten shards", "one shard"])
def test_remainder_waits_and_differs_between_epochs(tmp_path, sizes):
    ids = write_set(tmp_path, sizes)  # 100 samples: 2 × 6 batches of 8 use 96, 4 wait
    dm = datamodule(str(tmp_path))
    left_out = []
    for epoch in (0, 1, 2):
        ranks = epoch_ids(dm, epoch=epoch)
        assert [len(batches) for batches in ranks] == [6, 6]
        seen = [i for batches in ranks for batch in batches for i in batch]
        assert len(seen) == len(set(seen)) == 96
        left_out.append(set(ids) - set(seen))
    assert [len(waiting) for waiting in left_out] == [4, 4, 4]
    # the next epoch reads on where this one stopped: no sample is left out of every epoch, even in a single shard
    assert not set.intersection(*left_out)


def test_same_seed_same_stream_next_epoch_differs_and_resume_matches(tmp_path):
    write_set(tmp_path, [16] * 6)
    dm = datamodule(str(tmp_path), num_workers=2)
    assert epoch_ids(dm, epoch=0) == epoch_ids(dm, epoch=0)
    assert epoch_ids(dm, epoch=0) != epoch_ids(dm, epoch=1)
    assert epoch_ids(datamodule(str(tmp_path), seed=4), epoch=0) != epoch_ids(dm, epoch=0)

    # persistent workers follow the trainer's epoch; a loader started at epoch 1 (a resumed run) sees the same
    epoch = [0]
    loader = EpochLoader(dm.stream(0, 2), current_epoch=lambda: epoch[0], num_workers=2, persistent_workers=True)
    first = [ids_of(tokens) for _, tokens, *_ in loader]
    epoch[0] = 1
    second = [ids_of(tokens) for _, tokens, *_ in loader]
    resumed = EpochLoader(dm.stream(0, 2), current_epoch=lambda: 1, num_workers=2)
    assert first == epoch_ids(dm, epoch=0)[0]
    assert second == [ids_of(tokens) for _, tokens, *_ in resumed] != first


def test_resampled_mixture_follows_size_times_upsample(tmp_path):
    write_set(tmp_path / "a", [4] * 10, first_id=0)  # 40 samples, upsample 3 → weight 120
    write_set(tmp_path / "b", [4] * 30, first_id=1000)  # 120 samples, upsample 1 → weight 120
    mix = {"a": {"urls": str(tmp_path / "a"), "upsample": 3}, "b": {"urls": str(tmp_path / "b")}}
    dm = datamodule(mix, resampled=True, train_num_samples=4096, batch_size=64, shuffle_buffer=64)
    batches, _ = run_rank(dm.stream(0, 1))
    seen = [i for batch in batches for i in batch]
    assert len(seen) == 4096
    assert abs(sum(i < 1000 for i in seen) / len(seen) - 0.5) < 0.05


def test_whole_number_upsample_without_resampling_repeats_exactly(tmp_path):
    a = write_set(tmp_path / "a", [5, 5], first_id=0)
    b = write_set(tmp_path / "b", [5, 5], first_id=100)
    dm = datamodule({"a": {"urls": str(tmp_path / "a"), "upsample": 2}, "b": str(tmp_path / "b")}, batch_size=5)
    seen = Counter(i for batches in epoch_ids(dm) for batch in batches for i in batch)
    assert seen == Counter({**{i: 2 for i in a}, **{i: 1 for i in b}})
    with pytest.raises(ValueError, match="whole numbers unless data.resampled"):
        datamodule({"a": {"urls": str(tmp_path / "a"), "upsample": 1.5}}).stream()


def test_bad_data_is_skipped_counted_by_kind_and_refilled(tmp_path):
    usable, expected = write_bad_set(tmp_path)
    dm = datamodule(str(tmp_path / "{000..008}-000000.tar"))
    assert dm.batches_per_epoch(world_size=2) == 4  # 64 present samples listed, the missing shard left out
    ranks, counts = [], 0
    for rank in range(2):
        stream = dm.stream(rank, 2)
        counts = counts + dm.skipped.numpy()  # start-up counts: the missing shard, on rank 0 only
        batches, carried = run_rank(stream)
        ranks.append(batches)
        counts = counts + carried
    lost = 64 - len(usable)
    assert dict(zip(COUNTERS, counts.tolist())) == {**dict.fromkeys(COUNTERS, 0), **expected, "refilled": lost}
    # every rank still gets its 4 full batches; every usable sample appears, the refills repeat usable ones
    assert [len(batches) for batches in ranks] == [4, 4]
    seen = Counter(i for batches in ranks for batch in batches for i in batch)
    assert set(seen) == set(usable) and sum(seen.values()) == 64


def test_warnings_name_the_shard(tmp_path, caplog):
    write_bad_set(tmp_path)
    run_rank(datamodule(str(tmp_path / "{000..008}-000000.tar")).stream(0, 1), workers=0)
    assert "skipping shard unreadable in shard " + str(tmp_path / "001-000000.tar") in caplog.text
    assert "skipping image undecodable in shard " + str(tmp_path / "000-000000.tar") in caplog.text
    assert "1 of 9 shards are missing" in caplog.text


def test_bad_data_counts_reach_the_datamodule_through_worker_processes(tmp_path):
    _, expected = write_bad_set(tmp_path)
    dm = datamodule(str(tmp_path / "{000..008}-000000.tar"), num_workers=2)
    for batch in EpochLoader(dm.stream(0, 1), lambda: 0, num_workers=2):
        images, tokens, *_ = dm.on_before_batch_transfer(batch, 0)
        assert images.shape == (8, 3, 4, 4) and tokens.shape == (8, 1)
    assert {name: dm.skipped[COUNTERS.index(name)].item() for name in expected} == expected


def test_start_up_errors_say_what_to_set(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="names no shards"):
        datamodule(str(tmp_path / "empty")).num_samples()
    with pytest.raises(FileNotFoundError, match="none of the 3 shards"):
        datamodule(str(tmp_path / "{0..2}.tar")).num_samples()
    write_set(tmp_path / "s", [8, 8])
    (tmp_path / "s" / "sizes.json").unlink()
    with pytest.raises(ValueError, match="train_num_samples"):
        datamodule(str(tmp_path / "s")).num_samples()
    with pytest.raises(ValueError, match="no full batch"):
        datamodule(str(tmp_path / "s"), train_num_samples=16, batch_size=32).batches_per_epoch()
    # with the epoch size from the config, the sizes are spread evenly and the stream runs
    batches, _ = run_rank(datamodule(str(tmp_path / "s"), train_num_samples=16).stream(0, 1))
    assert sorted(i for batch in batches for i in batch) == list(range(16))


def test_sizes_from_info_and_img2dataset_stats_files(tmp_path):
    write_set(tmp_path, [5, 7])
    (tmp_path / "sizes.json").unlink()
    (tmp_path / "_info.json").write_text(json.dumps({"shardlist": [{"url": "000-000000.tar", "nsamples": 5}]}))
    (tmp_path / "001-000000_stats.json").write_text(json.dumps({"successes": 7, "failed_to_download": 3}))
    assert datamodule(str(tmp_path)).num_samples() == 12


def test_json_caption_field(tmp_path):
    from psdclip.data.writer import write_shards

    write_shards(
        [{"__key__": f"{i:03d}", "jpg": jpeg(i), "json": json.dumps({"caption": f"sample {i}"})} for i in range(8)],
        tmp_path,
        shard_size=4,
    )
    batches, counts = run_rank(datamodule(str(tmp_path), text_key="json:caption", batch_size=4).stream(0, 1))
    assert sorted(i for batch in batches for i in batch) == list(range(8)) and counts.sum() == 0


def test_replacements_repeat_no_sample_while_unused_ones_last(tmp_path):
    # 72 samples, 2 ranks × 4 batches of 8 use 64: 8 unused, 2 per worker, enough for the 2 undecodable samples
    ids = write_set(tmp_path, [8] * 9, undecodable={3, 4})
    for epoch in (0, 1):
        seen = Counter(
            i for batches in epoch_ids(datamodule(str(tmp_path)), epoch=epoch) for batch in batches for i in batch
        )
        assert sum(seen.values()) == 64 and max(seen.values()) == 1 and not set(seen) & {3, 4}
        assert set(seen) <= set(ids)


def test_replacements_without_unused_samples_never_pile_up_or_share_a_batch(tmp_path):
    # 64 samples, 2 ranks × 4 batches of 8: the epoch leaves nothing unused, so 6 replacements must repeat samples
    write_set(tmp_path, [16] * 4, undecodable={0, 1, 2, 3, 20, 21})
    for epoch in (0, 1, 2):
        batches = [batch for ranks in epoch_ids(datamodule(str(tmp_path)), epoch=epoch) for batch in ranks]
        assert all(len(set(batch)) == len(batch) == 8 for batch in batches)  # no sample twice in one batch
        seen = Counter(i for batch in batches for i in batch)
        assert sum(seen.values()) == 64 and max(seen.values()) <= 2  # a repeat at most once, not once per worker
        assert sum(count - 1 for count in seen.values()) == 6


def test_a_batch_defers_a_repeated_sample_to_the_next():
    items = [Decoded(None, "", -1, ("shard", key), False) for key in "aabcad"]
    batches = list(distinct_batches(iter(items), 3))
    # the second "a" waits for the next batch; the third would wait again, but the items end first
    assert [[item.key[1] for item in batch] for batch in batches] == [["a", "b", "c"], ["a", "d"]]


def test_threshold_pairs_are_a_share_of_the_pairs_but_their_cap_at_most():
    def planted(ids: PairIds, pairs: int) -> int:
        return sum(ids.donor(pair, 1024) is not None for pair in range(pairs))

    urls = [f"shard-{index}.tar" for index in range(4)]
    # 40,000 pairs listed: 3% would be 1,200 threshold pairs, the cap keeps about 300 (binomial, ±4 sd)
    assert 1_100 < planted(PairIds(urls, [10_000] * 4, 0, 0.03), 40_000) < 1_300
    assert 230 < planted(PairIds(urls, [10_000] * 4, 0, 0.03, threshold_cap=300), 40_000) < 370
    # a cap above the share's count changes nothing; unlisted sizes count against the epoch's samples instead
    assert PairIds(urls, [100] * 4, 0, 0.03, threshold_cap=300).threshold_share == 0.03
    assert PairIds(urls, [None] * 4, 0, 0.03, threshold_cap=300, pairs_hint=40_000).threshold_share == 0.0075
    with pytest.raises(ValueError, match="threshold_pairs_cap must be >= 1"):
        PairIds(urls, [100] * 4, 0, 0.03, threshold_cap=0)


def test_a_tar_shorter_than_its_size_file_counts_and_names_the_absent_samples(tmp_path, caplog):
    write_set(tmp_path, [8, 8, 8, 5])
    write_raw_tar(tmp_path / "004-000000.tar", {})  # what img2dataset writes when no caption decodes...
    (tmp_path / "004-000000_stats.json").write_text(json.dumps({"successes": 3}))  # ...while its stats count 3
    dm = datamodule(str(tmp_path))
    assert dm.num_samples() == 32  # 4 batches of 8, nothing unused: the absent samples fall in some worker's stretch
    _, counts = run_rank(dm.stream(0, 1))
    counted = dict(zip(COUNTERS, counts.tolist()))
    assert counted["sample_absent"] == 3 and counted["refilled"] == 3 and sum(counts) == 6
    assert caplog.text.count("sample absent in shard " + str(tmp_path / "004-000000.tar")) == 1
    assert "the tar holds 0 samples, its size file lists 3" in caplog.text


def test_a_tar_longer_than_its_size_file_is_counted_and_named(tmp_path, caplog):
    write_set(tmp_path, [8, 8, 8])
    set_size(tmp_path, "001-000000.tar", 5)  # 21 listed: 3 batches of 7
    batches, counts = run_rank(datamodule(str(tmp_path), batch_size=7).stream(0, 1))
    assert dict(zip(COUNTERS, counts.tolist()))["shard_overfull"] == 1 and sum(counts) == 1
    assert sorted(i for batch in batches for i in batch) == [*range(8), *range(8, 13), *range(16, 24)]
    assert "shard overfull in shard " + str(tmp_path / "001-000000.tar") in caplog.text


def test_each_bad_shard_is_warned_about_once_per_run_not_per_worker_and_epoch(tmp_path, caplog):
    write_set(tmp_path, [16], undecodable={1, 12})  # one bad image in each worker's half of the shard
    dm = datamodule(str(tmp_path), num_workers=2)
    loader = EpochLoader(dm.stream(0, 1), current_epoch=None, num_workers=2, persistent_workers=True)
    for _ in range(2):  # two epochs
        for batch in loader:
            dm.on_before_batch_transfer(batch, 0)
    assert dm.skipped[COUNTERS.index("image_undecodable")] == 4
    assert caplog.text.count("skipping image undecodable in shard") == 1


def test_epoch_skip_warning_follows_every_epoch_on_one_device(caplog):
    dm = SimpleNamespace(skipped=torch.zeros(len(COUNTERS), dtype=torch.int64))
    trainer = SimpleNamespace(datamodule=dm, strategy=SingleDeviceStrategy(torch.device("cpu")), is_global_zero=True)
    module, monitor = SimpleNamespace(log=lambda *args, **kwargs: None), DataQualityMonitor()
    for epoch, bad in enumerate([2, 3, 0, 1]):
        dm.skipped[COUNTERS.index("image_undecodable")] += bad  # the DataModule's counter grows in place
        trainer.current_epoch = epoch
        monitor.on_train_epoch_end(trainer, module)
    warned = [line for line in caplog.text.splitlines() if "skipped bad data" in line]
    assert [line.split("epoch ")[1][:1] for line in warned] == ["0", "1", "3"]
    assert "3 image_undecodable" in warned[1] and "1 image_undecodable" in warned[2]
