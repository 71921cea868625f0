"""The shard writer CLI, and `train.py data=cc3m` on its output (bad data counted in the logged metrics)."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from psdclip.data.make_shards import main
from tests.helpers.shard_sets import jpeg, write_bad_set

ROOT = Path(__file__).resolve().parents[1]


def read_back(folder: Path) -> dict[str, dict]:
    samples = wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False)
    return {sample["txt"].decode(): sample for sample in samples}


def test_folder_of_images_with_captions(tmp_path):
    source = tmp_path / "photos" / "nested"
    source.mkdir(parents=True)
    for i in range(5):
        (source / f"p{i}.jpg").write_bytes(jpeg(i))
        (source / f"p{i}.txt").write_text(f"a photo number {i}\n")
    Image.new("RGB", (9, 7)).save(source / "bitmap.bmp")  # re-encoded as JPEG
    (source / "bitmap.json").write_text(json.dumps({"caption": "a black bitmap"}))
    (source / "nocaption.jpg").write_bytes(jpeg(9))
    (source / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (source / "broken.txt").write_text("never written")

    sizes = main([str(tmp_path / "photos"), str(tmp_path / "out"), "--shard-size", "4"])
    assert sizes == {"000000.tar": 4, "000001.tar": 2}
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == sizes
    samples = read_back(tmp_path / "out")
    assert set(samples) == {f"a photo number {i}" for i in range(5)} | {"a black bitmap"}
    assert samples["a photo number 3"]["jpg"] == jpeg(3)  # stored byte for byte
    meta = json.loads(samples["a black bitmap"]["json"])
    assert (meta["width"], meta["height"], meta["caption"]) == (9, 7, "a black bitmap")
    assert Image.open(io.BytesIO(samples["a black bitmap"]["jpg"])).format == "JPEG"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_of_paths_and_captions(tmp_path, suffix):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(i))
        rows.append({"path": f"img/{i}.jpg", "text": f"caption {i}"})
    rows.append({"path": "img/missing.jpg", "text": "gone"})
    table = tmp_path / f"pairs{suffix}"
    if suffix == ".csv":
        with open(table, "w", newline="") as f:
            writer = csv.DictWriter(f, ["path", "text"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(table)
    main([str(table), str(tmp_path / "out"), "--image-column", "path", "--caption-column", "text"])
    assert set(read_back(tmp_path / "out")) == {"caption 0", "caption 1", "caption 2"}
    with pytest.raises(SystemExit, match="choose --image-column"):
        main([str(table), str(tmp_path / "out2")])


@pytest.mark.slow
def test_train_on_cc3m_config_reports_bad_data(tmp_path):
    _, expected = write_bad_set(tmp_path / "root" / "cc3m")
    run = subprocess.run(
        [
            sys.executable,
            "train.py",
            "data=cc3m",
            f"paths.data_root={tmp_path / 'root'}",
            "model=vit_tiny",
            "evaluation=default",  # cc3m's recipe evaluates on the paper's suite, which this test has no folders for
            "trainer.max_epochs=1",
            "data.batch_size=8",
            "data.num_workers=2",
            "~callbacks.evaluation",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(next((tmp_path / "run").rglob("metrics.csv"))) as metrics:
        rows = list(csv.DictReader(metrics))
    last = {key: value for row in rows for key, value in row.items() if value != ""}
    assert int(float(last["step"])) == 7  # 64 listed samples in batches of 8 (steps 0..7)
    expected.pop("shard_missing")  # a folder lists only the shards it has
    assert {kind: int(float(last[f"data/skipped/{kind}"])) for kind in expected} == expected
    output = run.stdout + run.stderr  # Hydra sends log records to stdout
    assert "skipping image undecodable in shard " in output and "data stream skipped" in output
