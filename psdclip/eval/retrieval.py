"""Image–text retrieval as CLIP_benchmark defines it: Recall@k where a query hits if any of its positives is in the top k."""

import torch
from torch import Tensor

from psdclip.eval.ranking import first_positive_rank, hit_rate

QUERIES_PER_CHUNK = 1024  # bounds the (queries, candidates) score matrix
# not torchmetrics: RetrievalRecall divides by a query's positives (an image has several captions); RetrievalHitRate,
# CLIP_benchmark's measure, stores every score with a query index and sorts each query in a Python loop, once per k


def retrieval_metrics(
    image_features: Tensor, text_features: Tensor, text_to_image: Tensor, ks=(1, 5, 10)
) -> dict[str, float]:
    """text→image and image→text Recall@k for every k, their mean per k, and the mean over all of them.

    ``text_to_image[t]`` is the index of the image caption ``t`` describes; an image may have several captions
    (all positives for it). Images without a caption take no part: they are neither image queries nor in the gallery
    that captions search, which is CLIP_benchmark's set of captioned images. Ties go to the lower index (the
    earlier image or caption), see ``first_positive_rank``. Features are L2-normalised.
    """
    if len(text_to_image) != len(text_features):
        raise ValueError(f"{len(text_features)} captions but {len(text_to_image)} caption→image indices")
    gallery = torch.unique(text_to_image)  # sorted: the captioned images in their order
    images, texts = image_features.float()[gallery], text_features.float()
    caption_image = torch.searchsorted(gallery, text_to_image)  # each caption's image, as a position in the gallery
    text_ranks = _ranks(texts, images, lambda rows: caption_image[rows, None] == torch.arange(len(images)))
    image_ranks = _ranks(images, texts, lambda rows: rows[:, None] == caption_image[None, :])
    metrics = {}
    for k in ks:
        metrics[f"t2i_r{k}"] = hit_rate(text_ranks, k)
        metrics[f"i2t_r{k}"] = hit_rate(image_ranks, k)
        metrics[f"r{k}"] = (metrics[f"t2i_r{k}"] + metrics[f"i2t_r{k}"]) / 2
    metrics["mean_recall"] = sum(metrics[f"r{k}"] for k in ks) / len(ks)
    return metrics


def _ranks(queries: Tensor, candidates: Tensor, positives_of) -> Tensor:
    chunks = []
    for start in range(0, len(queries), QUERIES_PER_CHUNK):
        rows = torch.arange(start, min(start + QUERIES_PER_CHUNK, len(queries)))
        chunks.append(first_positive_rank(queries[rows] @ candidates.T, positives_of(rows)))
    return torch.cat(chunks)
