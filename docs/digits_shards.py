"""scikit-learn's handwritten digits as a user's own data: training shards with caption noise, and an image-folder
evaluation set, for the study's second dataset (docs/noisy_caption_study.md, "A second dataset").

    python docs/digits_shards.py OUT --noise 0.4 --kind flip --seed 0

writes ``OUT/train/`` (1,297 captioned pairs as img2dataset-style shards with ``sizes.json``; the json marks each
caption ``corrupted`` or not, so training logs D's precision and recall) and ``OUT/eval/`` (``test/<class>/`` 500
images, ``train/<class>/`` the training images with their true class for the linear probe, and the zero-shot
templates). The split is fixed; ``--seed`` chooses which captions are wrong, as ``data.seed`` does for the embedded
data. Then: ``python train.py data=shards data.train_shards=OUT/train model=vit_tiny 'evaluation/datasets=[]'
+evaluation.datasets.digits={_target_:psdclip.eval.datasets.ImageFolderEvalSet,root:OUT/eval} …`` (the study's
full command: docs/noisy_caption_study.md).
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from psdclip.data.writer import encode_image, write_shards

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# written for this dataset; none is one of the zero-shot templates below
CAPTION_TEMPLATES = [
    "a handwritten {c}.",
    "the digit {c}, written by hand.",
    "a scanned {c}.",
    "a tiny image of the number {c}.",
    "someone wrote a {c}.",
    "the number {c} in pencil.",
    "a pixelated {c}.",
    "{c}, handwriting sample.",
]
ZEROSHOT_TEMPLATES = ["a photo of the digit {c}.", "the number {c}.", "a drawing of a {c}.", "a {c}."]
TEST_IMAGES = 500
SPLIT_SEED = 2026  # the split is the same for every run


def images_and_labels() -> tuple[list[Image.Image], np.ndarray]:
    digits = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(digits.target))
    # 8×8 images with 17 grey levels, scaled to the tiny model's 28 px
    images = [
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), mode="L").resize((28, 28), Image.BILINEAR)
        for i in order
    ]
    return images, digits.target[order]


def captions(labels: np.ndarray, noise: float, kind: str, seed: int) -> tuple[list[str], np.ndarray]:
    """One caption per image; a share ``noise`` wrong: another class's name (flip) or another class's image's caption
    (swap)."""
    rng = np.random.default_rng(seed)
    wrong = rng.random(len(labels)) < noise
    clean = [
        CAPTION_TEMPLATES[t].format(c=CLASSNAMES[y])
        for t, y in zip(rng.integers(len(CAPTION_TEMPLATES), size=len(labels)), labels)
    ]
    texts = list(clean)
    for index in np.flatnonzero(wrong):
        if kind == "flip":
            other = (labels[index] + rng.integers(1, len(CLASSNAMES))) % len(CLASSNAMES)
            texts[index] = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(c=CLASSNAMES[other])
        else:
            donors = np.flatnonzero(labels != labels[index])
            texts[index] = clean[donors[rng.integers(len(donors))]]
    return texts, wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--kind", choices=["flip", "swap"], default="flip")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images, labels = images_and_labels()
    train_images, train_labels = images[TEST_IMAGES:], labels[TEST_IMAGES:]
    texts, wrong = captions(train_labels, args.noise, args.kind, args.seed)
    samples = (
        {
            "__key__": f"{index:06d}",
            "png": encode_image(image),
            "txt": text,
            "json": json.dumps({"label": int(label), "corrupted": bool(corrupt)}),
        }
        for index, (image, label, text, corrupt) in enumerate(zip(train_images, train_labels, texts, wrong))
    )
    write_shards(samples, args.out / "train", shard_size=1000)

    for split, split_images, split_labels in (
        ("test", images[:TEST_IMAGES], labels[:TEST_IMAGES]),
        ("train", train_images, train_labels),
    ):
        for index, (image, label) in enumerate(zip(split_images, split_labels)):
            folder = args.out / "eval" / split / CLASSNAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:04d}.png")
    (args.out / "eval" / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    print(
        f"{len(train_labels)} training pairs ({wrong.mean():.3f} wrong) in {args.out / 'train'}; evaluation set in {args.out / 'eval'}"
    )


if __name__ == "__main__":
    main()
