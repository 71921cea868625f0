"""bench/scaling_study.py in --cpu mode: a tiny grid trained in one process, its rows written as each run ends, and a
second call that finds every row and trains nothing; bench/scaling_report.py on rows made to be checked by hand."""

import math
import sys

import pandas as pd
import pytest

from bench.scaling_report import detector_table, gain_table, paired_gains, report, with_effective_robustness
from bench.scaling_study import CELLS, MINIMUM, grid, run_name
from psdclip.eval.robustness import baseline_fit, logit
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
    text = report(tmp_path / "study")["table"].read_text()  # the report reads the runner's real rows
    assert "| zero-shot | psd_memory | flip | 0.4 | 128 |" in text and "| flip | 0.4 | 128 |" in text
    again = run_in_session(command, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "row: {" not in again.stdout and "all 2 runs have their rows" in again.stdout
    assert len(pd.read_csv(tmp_path / "study" / "rows.csv")) == 2


def study_rows() -> pd.DataFrame:
    """Two sizes × two seeds of CLIP, PSD and PSD with memory at 40% flip, with numbers chosen to check by hand."""
    rows = []
    for size, base in ((550, 0.60), (5500, 0.70)):
        for seed, shift in ((0, 0.0), (1, 0.02)):
            clean = base + shift
            for loss, gain, robust in (("clip", 0.0, 0.0), ("psd", 0.03 + shift, 0.05), ("psd_memory", 0.01, 0.0)):
                row = {"size": size, "kind": "flip", "noise": 0.4, "loss": loss, "seed": seed}
                row.update(zeroshot_test=clean + gain, linear_probe_test=clean + gain / 2, zeroshot_val=clean)
                row.update(zeroshot_shifted=(clean + gain) / 2 + robust, seconds=60.0 + size / 100, train_seconds=40.0)
                if loss == "psd_memory":
                    row.update(noise_estimate=0.45, noise_estimate_low=0.35 + seed * 0.1, noise_estimate_high=0.5)
                    row.update(truth=0.42, memory_auroc=0.9 + size / 1e5, threshold_pairs=size // 10)
                rows.append(row)
    return pd.DataFrame(rows)


def test_the_report_pairs_gains_by_seed_judges_the_estimate_and_fits_clip_for_effective_robustness(tmp_path):
    rows = study_rows()
    rows.to_csv(tmp_path / "rows.csv", index=False)
    paths = report(tmp_path)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["table"].read_text()
    # PSD − CLIP per seed: +0.03 and +0.05 at both sizes → +0.0400 ± 0.0141; its linear probe half that
    gains = gain_table(paired_gains(rows)).set_index(["metric", "loss", "size"])["− CLIP (mean ± std)"]
    assert gains[("zero-shot", "psd", 550)] == gains[("zero-shot", "psd", 5500)] == "+0.0400 ± 0.0141"
    assert gains[("linear probe", "psd", 550)] == "+0.0200 ± 0.0071"
    assert gains[("zero-shot", "psd_memory", 5500)] == "+0.0100 ± 0.0000"
    detector = detector_table(rows).set_index("size")
    assert detector.loc[550, "estimate_error"] == pytest.approx(0.03)
    assert detector.loc[550, "range_holds"] == 1 and detector.loc[550, "runs"] == 2  # seed 1's low end is 0.45 > 0.42
    assert detector.loc[5500, "auroc"] == pytest.approx(0.955) and detector.loc[5500, "threshold_pairs"] == 550
    # the fit over CLIP's four runs; PSD's shifted accuracy is 0.05 above its half of clean accuracy
    with_robustness, fit = with_effective_robustness(rows)
    clip = rows[rows["loss"] == "clip"]
    assert fit == pytest.approx(baseline_fit(clip["zeroshot_test"].tolist(), clip["zeroshot_shifted"].tolist()))
    run = with_robustness[with_robustness["loss"] == "psd"].iloc[0]
    slope, intercept = fit
    predicted = 1 / (1 + math.exp(-(slope * logit(run["zeroshot_test"]) + intercept)))
    assert run["effective_robustness"] == pytest.approx(run["zeroshot_shifted"] - predicted)
    assert with_robustness.loc[with_robustness["loss"] == "clip", "effective_robustness"].abs().max() < 0.01
    assert "Effective robustness (CLIP's fit" in text and "| 5500 |" in text


def test_the_report_of_a_lease_cut_short_has_the_cells_measured_so_far(tmp_path):
    rows = study_rows()
    measured = rows[(rows["loss"] != "psd_memory") & (rows["size"] == 550) & (rows["seed"] == 0)]
    measured.dropna(axis="columns").to_csv(tmp_path / "rows.csv", index=False)  # as the runner writes them: no memory
    text = report(tmp_path)["table"].read_text()
    assert "(2 runs)" in text and "| zero-shot | psd | flip | 0.4 | 550 | +0.0300 (n=1) | 1 |" in text
    assert "Effective robustness" not in text and "detector" not in text  # one CLIP run: nothing to fit yet
    assert "| 550 | clip | 1 |" in text
