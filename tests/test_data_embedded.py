import json

import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf

from psdclip.data.embedded import CLASSNAMES, EmbeddedDataModule, FashionMNISTShards
from psdclip.data.samples import COUNTERS
from psdclip.models import create_clip
from tests.conftest import compose_config, tiny_paths


def read_samples(pattern):
    return list(wds.DataPipeline(wds.SimpleShardList(pattern), wds.tarfile_to_samples(), wds.decode("pil")))


def embedded_data(fashion_mnist_dir, tmp_path, **settings) -> EmbeddedDataModule:
    """The data module ``conf/data/embedded.yaml`` configures, on the test's files, with ``settings`` instead."""
    configured = OmegaConf.to_container(compose_config(tiny_paths(fashion_mnist_dir, tmp_path)).data, resolve=True)
    del configured["_target_"]
    return EmbeddedDataModule(**{**configured, **settings})


def test_train_shards_carry_the_requested_caption_noise(fashion_mnist_dir, tmp_path):
    shards = FashionMNISTShards("train", str(fashion_mnist_dir), str(tmp_path), noise=0.3, shard_size=100)
    shards.ensure()
    samples = read_samples(shards.pattern)
    assert len(samples) == 320 and shards.num_shards == 4
    assert json.loads((shards.directory / "sizes.json").read_text()) == {
        "train-000000.tar": 100,
        "train-000001.tar": 100,
        "train-000002.tar": 100,
        "train-000003.tar": 20,
    }
    meta = [sample["json"] for sample in samples]
    corrupted = np.array([m["corrupted"] for m in meta])
    assert abs(corrupted.mean() - 0.3) < 0.08
    for sample, m in zip(samples, meta):
        assert (m["caption_label"] != m["label"]) == m["corrupted"]
        assert CLASSNAMES[m["caption_label"]] in sample["txt"]
        assert int(sample["cls"]) == m["label"] and sample["png"].size == (28, 28)


def test_test_split_is_clean_with_several_captions(fashion_mnist_dir, tmp_path):
    shards = FashionMNISTShards("test", str(fashion_mnist_dir), str(tmp_path), noise=0.5)
    shards.ensure()
    samples = read_samples(shards.pattern)
    assert len(samples) == 100
    for sample in samples:
        m = sample["json"]
        assert not m["corrupted"] and len(set(m["captions"])) == 5
        assert all(CLASSNAMES[m["label"]] in caption for caption in m["captions"])


def test_shards_are_rebuilt_only_when_settings_change(fashion_mnist_dir, tmp_path):
    first = FashionMNISTShards("train", str(fashion_mnist_dir), str(tmp_path), noise=0.3, shard_size=100)
    first.ensure()
    stamp = (first.directory / "manifest.json").stat().st_mtime_ns
    same = FashionMNISTShards("train", str(fashion_mnist_dir), str(tmp_path), noise=0.3, shard_size=100)
    assert same.ensure() == first.directory
    assert (first.directory / "manifest.json").stat().st_mtime_ns == stamp
    other = FashionMNISTShards("train", str(fashion_mnist_dir), str(tmp_path), noise=0.1, shard_size=100)
    assert other.directory != first.directory


def test_noise_outside_unit_interval_is_refused(fashion_mnist_dir, tmp_path):
    with pytest.raises(ValueError, match="data.noise must be a fraction in \\[0, 1\\], got -0.1"):
        FashionMNISTShards("train", str(fashion_mnist_dir), str(tmp_path), noise=-0.1)


def test_missing_idx_files_explain_how_to_get_them(fashion_mnist_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*paths.fashion_mnist_dir"):
        embedded_data(fashion_mnist_dir, tmp_path, source_dir=str(tmp_path))


def test_datamodule_streams_full_batches_of_images_and_tokens(fashion_mnist_dir, tmp_path):
    clip = create_clip("psdclip-vit-tiny")
    data = embedded_data(
        fashion_mnist_dir,
        tmp_path,
        shard_size=100,
        batch_size=32,
        num_workers=0,
        transform=clip.train_transform,
        tokenizer=clip.tokenizer,
    )
    data.prepare_data()
    assert data.batches_per_epoch() == 10
    loader = data.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 10
    # the DataModule takes the skip counts off before the model sees the batch
    images, tokens, skipped, marks, _, planted = batches[0]
    assert images.shape == (32, 3, 28, 28) and tokens.shape == (32, 16) and tokens.dtype == torch.long
    # dense identities (every shard's size is listed): each pair once per epoch, none planted
    pairs = data.num_samples()
    assert data.pair_space() == pairs and not planted.any()
    assert sorted(torch.cat([batch[4] for batch in batches]).tolist()) == list(range(pairs))
    assert skipped.counts.sum() == 0 and skipped.notes == []
    # each sample's noise mark is its json's "corrupted" flag (data.noise defaults to 0.3)
    assert marks.dtype == torch.int8 and set(marks.tolist()) == {0, 1}
    # the next epoch streams the samples in a different order
    assert not torch.equal(next(iter(loader))[1], tokens)


def test_interrupted_writes_leave_no_shard(tmp_path):
    from psdclip.data.writer import write_shards

    def samples():
        yield {"__key__": "a", "txt": "x"}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(samples(), tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())


def test_concurrent_builders_leave_one_complete_folder(fashion_mnist_dir, tmp_path):
    """Two processes (e.g. DDP ranks) building the same split at once: both succeed, one folder remains."""
    import multiprocessing

    args = ("test", str(fashion_mnist_dir), str(tmp_path))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        folders = pool.starmap(_build, [args, args])
    assert folders[0] == folders[1]
    assert len(read_samples(FashionMNISTShards(*args).pattern)) == 100
    assert [p.name for p in (tmp_path / "fashion_mnist").iterdir()] == [folders[0].name]


def _build(split, source_dir, cache_dir):
    return FashionMNISTShards(split, source_dir, cache_dir).ensure()


def test_evaluation_on_missing_fashion_mnist_fails_at_start_up(tmp_path):
    """The evaluation set (which the media callback also draws from) checks for the idx files when built, not after
    a long training."""
    from psdclip.eval.datasets import FashionMNISTEvalSet

    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTEvalSet(source_dir=str(tmp_path), cache_dir=str(tmp_path))


@pytest.mark.parametrize("kind", ["flip", "swap", "generic"])
def test_each_noise_kind_is_written_with_its_flags_and_read_back(fashion_mnist_dir, tmp_path, kind):
    from psdclip.data.embedded import CAPTION_TEMPLATES, GENERIC_CAPTIONS

    shards = FashionMNISTShards(
        "train", str(fashion_mnist_dir), str(tmp_path), noise=0.4, noise_kind=kind, shard_size=100
    )
    shards.ensure()
    samples = read_samples(shards.pattern)
    assert len(samples) == 320 and f"-{kind}-" in shards.directory.name
    wrong = [s for s in samples if s["json"]["corrupted"]]
    assert abs(len(wrong) / len(samples) - 0.4) < 0.08
    clean_text = {s["__key__"]: s["txt"] for s in samples if not s["json"]["corrupted"]}
    for sample in samples:
        meta = sample["json"]
        if not meta["corrupted"]:
            assert meta["caption_label"] == meta["label"] and CLASSNAMES[meta["label"]] in sample["txt"]
        elif kind == "generic":
            assert meta["caption_label"] == -1 and sample["txt"] in GENERIC_CAPTIONS
        else:  # flip and swap name another class, in a caption template
            assert meta["caption_label"] not in (meta["label"], -1)
            assert CLASSNAMES[meta["caption_label"]] in sample["txt"]
            assert any(sample["txt"] == t.format(c=CLASSNAMES[meta["caption_label"]]) for t in CAPTION_TEMPLATES)
        if kind == "swap" and meta["corrupted"]:
            donor = f"{meta['swapped_from']:06d}"
            assert samples[meta["swapped_from"]]["json"]["label"] == meta["caption_label"]
            assert donor not in clean_text or clean_text[donor] == sample["txt"]  # the donor's own caption


def test_the_stream_marks_each_pair_with_its_corrupted_flag(fashion_mnist_dir, tmp_path):
    from psdclip.data.pipeline import noise_mark

    assert [
        noise_mark(s)
        for s in (
            {"json": b'{"corrupted": true}'},
            {"json": b'{"corrupted": false}'},
            {"json": b"{}"},
            {"json": b"not json"},
            {"json": b"[1]"},
            {"txt": b"x"},
        )
    ] == [1, 0, -1, -1, -1, -1]
    clip = create_clip("psdclip-vit-tiny")
    data = embedded_data(
        fashion_mnist_dir,
        tmp_path,
        noise=0.4,
        noise_kind="swap",
        shard_size=100,
        batch_size=320,
        num_workers=0,
        transform=clip.train_transform,
        tokenizer=clip.tokenizer,
    )
    data.prepare_data()
    ((_, _, _, marks, _, _),) = list(data.train_dataloader())  # one batch: the whole epoch, every sample once
    assert marks.sum().item() == sum(s["json"]["corrupted"] for s in read_samples(data.shards.pattern)) > 0


def test_shard_cache_separates_noise_kinds_and_sizes(fashion_mnist_dir, tmp_path):
    make = lambda **kw: FashionMNISTShards("train", str(fashion_mnist_dir), str(tmp_path), **kw).directory
    folders = {
        make(noise=0.4),
        make(noise=0.4, noise_kind="swap"),
        make(noise=0.4, noise_kind="generic"),
        make(noise=0.4, size=100),
        make(noise=0.0),
    }
    assert len(folders) == 5
    assert make(noise=0.0) == make(noise=0.0, noise_kind="swap")  # the kind of no noise is no setting


def test_val_split_is_held_out_clean_and_disjoint_from_train(fashion_mnist_dir, tmp_path):
    from psdclip.data.embedded import find_idx, read_idx

    val = FashionMNISTShards("val", str(fashion_mnist_dir), str(tmp_path), noise=0.5)
    train = FashionMNISTShards("train", str(fashion_mnist_dir), str(tmp_path), noise=0.5)
    assert (val.num_samples, train.num_samples) == (29, 320)
    val.ensure()
    samples = read_samples(val.pattern)
    pixels = read_idx(find_idx(fashion_mnist_dir, "train-images-idx3-ubyte"))
    for index, sample in enumerate(samples):
        assert not sample["json"]["corrupted"] and len(sample["json"]["captions"]) == 5
        assert np.array_equal(
            np.asarray(sample["png"].convert("L")), pixels[320 + index]
        )  # the last 29 training images


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"noise_kind": "typo"}, "unknown data.noise_kind 'typo'"),
        ({"size": 400}, "data.train_size=400 is more than the 320 images"),
        ({"size": 0}, "data.train_size must be a positive"),
    ],
)
def test_bad_data_settings_are_refused(fashion_mnist_dir, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _ = FashionMNISTShards("train", str(fashion_mnist_dir), str(tmp_path), **kwargs).num_samples


def epoch_pairs(data, epoch=0) -> dict[int, tuple[str, bool, int]]:
    """Each pair id of one epoch's stream → (caption tokens, planted, noise mark)."""
    pairs = {}
    for _, tokens, _, marks, ids, planted in data.stream(epoch=epoch):
        for token_row, pair_id, flag, mark in zip(tokens.tolist(), ids.tolist(), planted.tolist(), marks.tolist()):
            pairs[pair_id] = (tuple(token_row), flag, mark)
    return pairs


def test_threshold_pairs_are_reproducible_from_the_seed_and_never_reach_evaluation(fashion_mnist_dir, tmp_path):
    clip = create_clip("psdclip-vit-tiny")

    def data(seed, share):
        module = embedded_data(
            fashion_mnist_dir,
            tmp_path,
            noise=0.0,
            shard_size=100,
            batch_size=50,
            num_workers=0,
            seed=seed,
            threshold_pairs=share,
            transform=clip.train_transform,
            tokenizer=clip.tokenizer,
        )
        module.prepare_data()
        return module

    clean, planted_a = epoch_pairs(data(0, 0.0)), epoch_pairs(data(0, 0.2))
    planted_ids = {pair for pair, (_, flag, _) in planted_a.items() if flag}
    assert 0.12 < len(planted_ids) / len(planted_a) < 0.28
    # the same pairs with the same wrong captions in another epoch (their identity decides, not the stream order:
    # a threshold pair is wrong the same way every time, as a real wrong caption is), other pairs under another seed
    later = epoch_pairs(data(0, 0.2), epoch=1)
    common = planted_a.keys() & later.keys()
    assert len(common) > 250 and all(planted_a[pair][:2] == later[pair][:2] for pair in common)
    other_seed = epoch_pairs(data(1, 0.2))
    assert {pair for pair in common if other_seed.get(pair, (0, False))[1]} != planted_ids & common
    # a planted pair carries another pair's caption, not its own, and no noise mark; every other pair is as without
    # planting
    donors = set()
    for pair, (tokens, flag, mark) in planted_a.items():
        own_tokens, _, own_mark = clean[pair]
        if flag:
            assert mark == -1 and tokens != own_tokens and tokens in {caption for caption, _, _ in clean.values()}
            donors.add(tokens)
        else:
            assert (tokens, mark) == (own_tokens, own_mark)
    assert len(donors) > 1
    # evaluation reads the shards with the shared reader, not the training stream: it never sees a planted caption
    from psdclip.data.samples import shard_samples

    captions = [
        sample["txt"].decode()
        for shard in data(0, 0.2).resolved_shards
        for sample in shard_samples(shard.url, 0, shard.size, lambda *_: None)
    ]
    assert [tuple(row) for row in clip.tokenizer(captions[:5]).tolist()] == [clean[pair][0] for pair in range(5)]


def test_excluded_keys_are_left_out_counted_and_the_epoch_shrinks(fashion_mnist_dir, tmp_path):
    clip = create_clip("psdclip-vit-tiny")
    settings = {"noise": 0.0, "shard_size": 100, "batch_size": 20, "num_workers": 0, "shuffle_buffer": 10}
    data = embedded_data(
        fashion_mnist_dir, tmp_path, **settings, transform=clip.train_transform, tokenizer=clip.tokenizer
    )
    data.prepare_data()
    shard = data.resolved_shards[0].url
    # an audit's table: only its flagged rows are left out
    table = pd.DataFrame({"shard": [shard] * 30, "key": [f"{i:06d}" for i in range(30)], "flagged": [True, False] * 15})
    table.to_csv(tmp_path / "memory.csv", index=False)
    keys = {key for key in table[table["flagged"]]["key"]}
    excluding = embedded_data(
        fashion_mnist_dir,
        tmp_path,
        **settings,
        exclude_keys=str(tmp_path / "memory.csv"),
        transform=clip.train_transform,
        tokenizer=clip.tokenizer,
    )
    assert excluding.num_samples() == data.num_samples() - 15
    seen, excluded = set(), 0
    for batch in excluding.stream():
        excluded += int(batch[2].counts[COUNTERS.index("excluded")])
        seen |= set(batch[4].tolist())
    # the first shard's keys are the pairs' places in it: its dense identities
    assert excluded == 15 and not {int(key) for key in keys} & seen and len(seen) == excluding.num_samples() // 20 * 20
    with pytest.raises(ValueError, match=r"data.exclude_keys=.*bad.csv needs the columns \['shard', 'key'\]"):
        pd.DataFrame({"id": [1]}).to_csv(tmp_path / "bad.csv", index=False)
        embedded_data(fashion_mnist_dir, tmp_path, **settings, exclude_keys=str(tmp_path / "bad.csv"))
