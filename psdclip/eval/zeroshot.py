"""Zero-shot classification as CLIP_benchmark defines it: prompt-ensembled class weights, top-k accuracy, mean per-class recall."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_recall


@torch.no_grad()
def classifier_weights(encode_text: Callable[[Tensor], Tensor], tokenizer: Callable, classnames: list[str], templates: list[str], device=None) -> Tensor:
    """(classes, dim): per class, the mean of the L2-normalised template embeddings, re-normalised.

    Templates use ``{c}`` for the class name (CLIP_benchmark's convention).
    """
    weights = []
    for name in classnames:
        tokens = tokenizer([template.format(c=name) for template in templates]).to(device)
        embeddings = F.normalize(encode_text(tokens).float(), dim=-1)
        weights.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(weights)


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """top-1, top-5 (with at least 5 classes) and mean per-class recall."""
    num_classes = logits.shape[1]
    metrics = {
        "top1": multiclass_accuracy(logits, labels, num_classes, average="micro").item(),
        "mean_per_class_recall": multiclass_recall(logits, labels, num_classes, average="macro").item(),
    }
    if num_classes >= 5:
        metrics["top5"] = multiclass_accuracy(logits, labels, num_classes, average="micro", top_k=5).item()
    return metrics
