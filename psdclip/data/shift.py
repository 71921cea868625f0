"""Seeded image corruptions in the manner of MNIST-C (Mu & Gilmer, 2019), for an embedded shifted test set: zero-shot
on Fashion-MNIST's test images under corruptions, beside the clean test split, gives effective robustness
(``psdclip.eval.robustness``) on a laptop."""

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter


def rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(15, 45) * rng.choice((-1, 1))
    return np.asarray(Image.fromarray(image).rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0))


def blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.6))))


def noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = image + rng.normal(0.0, rng.uniform(25, 60), image.shape)
    return noisy.clip(0, 255).astype(np.uint8)


def contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mean = image.mean()
    return (mean + (image - mean) * rng.uniform(0.2, 0.4)).clip(0, 255).astype(np.uint8)


def invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255 - image


CORRUPTIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "rotate": rotate,
    "blur": blur,
    "noise": noise,
    "contrast": contrast,
    "invert": invert,
}


def check_corruptions(kinds: Sequence[str]) -> None:
    """A clear error naming the unknown corruptions of ``kinds``, or none given."""
    unknown = [kind for kind in kinds if kind not in CORRUPTIONS]
    if unknown or not kinds:
        raise ValueError(f"unknown image corruptions {unknown or '(none given)'}; choose from {list(CORRUPTIONS)}")


def corrupt(images: np.ndarray, kinds: Sequence[str], seed: int) -> tuple[np.ndarray, list[str]]:
    """Each uint8 grayscale image of ``images`` (N×H×W) under one corruption of ``kinds``, drawn in turn so that each
    kind covers an equal share, at a seeded severity; returns the images and the corruption each got."""
    rng = np.random.default_rng(seed)
    order = [kinds[index % len(kinds)] for index in rng.permutation(len(images))]
    shifted = np.stack([CORRUPTIONS[kind](image, rng) for image, kind in zip(images, order)])
    return shifted, order
