"""bench/scaling_study.py in --cpu mode: a tiny grid trained in one process, its rows written as each run ends, and a
second call that finds every row and trains nothing."""

import sys

import pandas as pd

from bench.scaling_study import CELLS, MINIMUM, grid, run_name
from tests.helpers.processes import run_in_session


def test_the_grid_measures_the_minimum_cells_at_every_size_before_the_rest():
    runs = grid([550, 5500], [0, 1], list(CELLS))
    assert len(runs) == 2 * 2 * len(CELLS) and len({run_name(run) for run in runs}) == len(runs)
    first = runs[: 2 * 2 * MINIMUM]
    assert {(run["kind"], run["noise"], run["loss"]) for run in first} == {("flip", 0.4, "clip"), ("flip", 0.4, "psd")}
    assert [run["size"] for run in first] == [550] * 4 + [5500] * 4


def test_cpu_mode_trains_a_tiny_grid_and_a_second_call_continues_it(fashion_mnist_dir, tmp_path):
    command = [
        sys.executable,
        "-m",
        "bench.scaling_study",
        "--cpu",
        "--out",
        str(tmp_path / "study"),
        "--fashion-mnist",
        str(fashion_mnist_dir),
        "--sizes",
        "128",
        "--seeds",
        "0",
        "--cells",
        "flip:0.4:clip",
        "flip:0.4:psd_memory",
        "--epochs",
        "6",  # the memory decides after min_sightings (6) epochs
        "--override",
        "data.batch_size=32",
        "model=vit_tiny",
    ]
    done = run_in_session(command, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    rows = pd.read_csv(tmp_path / "study" / "rows.csv")
    assert rows["loss"].tolist() == ["clip", "psd_memory"] and (rows["size"] == 128).all()
    for column in ("zeroshot_test", "zeroshot_shifted", "zeroshot_val", "linear_probe_test"):
        assert rows[column].between(0, 1).all(), column
    assert (rows["seconds"] > 0).all() and (rows["train_seconds"] > 0).all()
    memory = rows.iloc[1]
    assert 0 <= memory["noise_estimate_low"] <= memory["noise_estimate"] <= memory["noise_estimate_high"] <= 1
    assert 0.2 < memory["truth"] < 0.6 and 0 <= memory["memory_auroc"] <= 1 and memory["threshold_pairs"] > 0
    assert done.stdout.count("row: {") == 2
    again = run_in_session(command, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "row: {" not in again.stdout and "all 2 runs have their rows" in again.stdout
    assert len(pd.read_csv(tmp_path / "study" / "rows.csv")) == 2
