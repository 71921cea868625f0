"""evaluate.py end to end on a tiny random checkpoint: a generated CLIP_benchmark-layout wds set, a retrieval set and an image folder."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from psdclip.data.writer import encode_image
from psdclip.eval.datasets import ImageFolderEvalSet, WdsEvalSet
from psdclip.eval.suite import EvalSuite
from psdclip.models import create_clip
from tests.helpers.checkpoints import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["red square", "green square", "blue square"]


def image(label: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 80, (28, 28, 3))
    pixels[..., label] = 255
    return Image.fromarray(pixels.astype(np.uint8))


def write_tar(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def make_classification_wds(root: Path, per_split: dict[str, int]) -> Path:
    for split, count in per_split.items():
        samples = [
            {"__key__": f"{i:04d}", "png": encode_image(image(i % 3, i)), "cls": str(i % 3)} for i in range(count)
        ]
        write_tar(root / split / "0.tar", samples[: count // 2])
        write_tar(root / split / "1.tar", samples[count // 2 :])
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    return root


def make_retrieval_wds(root: Path, count: int = 12) -> Path:
    samples = [
        {
            "__key__": f"{i:04d}",
            "jpg": encode_image(image(i % 3, 100 + i), "jpg"),
            "txt": f"a {CLASSES[i % 3]}\na picture of a {CLASSES[i % 3]} number {i}\n",
        }
        for i in range(count)
    ]
    write_tar(root / "test" / "0.tar", samples)
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def make_image_folder(root: Path, per_class: int = 4) -> Path:
    for label, name in enumerate(CLASSES):
        (root / name.replace(" ", "_")).mkdir(parents=True)
        for i in range(per_class):
            image(label, 200 + 10 * label + i).save(root / name.replace(" ", "_") / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


def reference_zeroshot_top1(checkpoint: Path, root: Path) -> float:
    """Zero-shot top-1 written out directly with the open_clip model (CLIP_benchmark's formula)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    clip = create_clip("psdclip-vit-tiny")
    clip.model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    model = clip.model.eval()
    templates = ["a photo of a {c}.", "a drawing of a {c}."]
    with torch.no_grad():
        weights = []
        for name in CLASSES:
            embeddings = F.normalize(model.encode_text(clip.tokenizer([t.format(c=name) for t in templates])), dim=-1)
            weights.append(F.normalize(embeddings.mean(0), dim=0))
        correct, total = 0, 0
        for sample in wds.DataPipeline(
            wds.SimpleShardList(sorted(map(str, (root / "test").glob("*.tar")))),
            wds.tarfile_to_samples(),
            wds.decode("pilrgb"),
        ):
            feature = F.normalize(model.encode_image(clip.eval_transform(sample["png"])[None]), dim=-1)
            correct += int((feature @ torch.stack(weights).T).argmax() == sample["cls"])
            total += 1
    return correct / total


def run_evaluate(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "evaluate.py", *overrides], check=False, cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_evaluate_py_on_wds_sets_and_an_image_folder(checkpoint, tmp_path):
    eval_root = tmp_path / "eval"
    make_classification_wds(eval_root / "wds_cifar10", {"test": 18, "train": 30})
    make_retrieval_wds(eval_root / "wds_flickr30k")
    folder = make_image_folder(tmp_path / "folder")
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    results = tmp_path / "results.json"
    done = run_evaluate(
        f"ckpt={checkpoint}",
        f"paths.eval_root={eval_root}",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"results_file={results}",
        "evaluation/datasets=[cifar10,flickr30k]",
        "evaluation.batch_size=7",
        f"+evaluation.datasets.shapes={{_target_:psdclip.eval.datasets.ImageFolderEvalSet,root:{folder}}}",
        "evaluation.linear_probe.log10_range=[-2,2]",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(results.read_text())["metrics"]
    expected = {
        "eval/cifar10/zeroshot_top1",
        "eval/cifar10/zeroshot_mean_per_class_recall",
        "eval/cifar10/linear_probe_top1",
        "eval/cifar10/linear_probe_mean_per_class_recall",
        "eval/cifar10/linear_probe_C",
        "eval/flickr30k/retrieval_t2i_r1",
        "eval/flickr30k/retrieval_i2t_r10",
        "eval/flickr30k/retrieval_mean_recall",
        "eval/shapes/zeroshot_top1",
    }
    assert expected <= set(metrics), sorted(metrics)
    assert not any(key.startswith(("eval/flickr30k/zeroshot", "eval/shapes/linear_probe")) for key in metrics)
    assert metrics["eval/cifar10/zeroshot_top1"] == pytest.approx(
        reference_zeroshot_top1(checkpoint, eval_root / "wds_cifar10")
    )
    # the colour is the class, so a linear probe on even random features separates it
    assert metrics["eval/cifar10/linear_probe_top1"] > 0.5
    # 12 images, 24 captions: R@10 covers most of the gallery
    assert metrics["eval/flickr30k/retrieval_i2t_r10"] >= 0.5
    assert "cifar10" in done.stdout and "retrieval_mean_recall" in done.stdout


def test_the_suite_shares_test_features_and_splits_ranks(checkpoint, tmp_path):
    """Two 'ranks' each encode half of the images; gathered, they give the single-process metrics."""
    from psdclip.eval.features import Runtime, SplitFeatures
    from psdclip.eval.model import load_checkpoint

    root = make_classification_wds(tmp_path / "wds_toy", {"test": 12})
    model = load_checkpoint(checkpoint).eval()
    suite = EvalSuite({"toy": WdsEvalSet(str(root))}, ["zeroshot"], batch_size=5)
    single = suite.run(model)
    shares = [
        suite.features(
            model, suite.datasets["toy"], "test", Runtime(rank=r, world_size=2, all_gather=lambda t: t[None])
        )
        for r in (0, 1)
    ]
    assert sorted(len(s.labels) for s in shares) == [6, 6]
    assert torch.equal(torch.cat([s.labels for s in shares]).sort().values, torch.tensor([0, 1, 2] * 4).sort().values)
    assert set(single) == {"eval/toy/zeroshot_top1", "eval/toy/zeroshot_mean_per_class_recall"}
    # the two halves together, as the gather hands them to rank 0, give the single process's metrics
    gathered = SplitFeatures(torch.cat([s.images for s in shares]), torch.cat([s.labels for s in shares]))
    halves = suite.zeroshot(model, suite.datasets["toy"], gathered, Runtime())
    assert {f"eval/toy/zeroshot_{name}": value for name, value in halves.items()} == pytest.approx(single)


def test_clear_errors_name_the_path(checkpoint, tmp_path):
    from psdclip.eval.model import load_checkpoint

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        WdsEvalSet(str(tmp_path / "missing"))
    root = make_classification_wds(tmp_path / "wds_toy", {"test": 6})
    (root / "classnames.txt").write_text("only one class\n")
    model = load_checkpoint(checkpoint).eval()
    with pytest.raises(ValueError, match=f"{root / 'classnames.txt'} lists 1 classes"):
        EvalSuite({"toy": WdsEvalSet(str(root))}, ["zeroshot"], batch_size=256).run(model)
    (root / "empty" / "test").mkdir(parents=True)
    (root / "empty" / "zeroshot_classification_templates.txt").write_text("a {c}\n")
    with pytest.raises(FileNotFoundError, match=f"no test shards .* in {root / 'empty' / 'test'}"):
        EvalSuite({"empty": WdsEvalSet(str(root / "empty"))}, ["zeroshot"], batch_size=256).run(model)
    write_tar(root / "hollow" / "test" / "0.tar", [])
    (root / "hollow" / "zeroshot_classification_templates.txt").write_text("a {c}\n")
    with pytest.raises(ValueError, match=f"the test split of {root / 'hollow'} is empty"):
        EvalSuite({"hollow": WdsEvalSet(str(root / "hollow"))}, ["zeroshot"], batch_size=256).run(model)
    folder = make_image_folder(tmp_path / "folder")
    (folder / "names.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=f"{folder / 'names.txt'} lists 2 class names but {folder} has 3"):
        _ = ImageFolderEvalSet(str(folder), classnames_file=str(folder / "names.txt")).classnames
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.ckpt")
