"""Zero-shot classification as CLIP_benchmark defines it: prompt-ensembled class weights, top-k accuracy, mean per-class recall."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_recall

from psdclip.eval.features import TEXT_BATCH, unit_rows
from psdclip.eval.ranking import first_positive_rank, hit_rate


@torch.no_grad()
def classifier_weights(
    encode_text: Callable[[Tensor], Tensor],
    tokenizer: Callable,
    classnames: list[str],
    templates: list[str],
    device=None,
) -> Tensor:
    """(classes, dim): per class, the mean of the L2-normalised template embeddings, re-normalised.

    Templates use ``{c}`` for the class name (CLIP_benchmark's convention).
    """
    texts = [template.format(c=name) for name in classnames for template in templates]
    embeddings = torch.cat(
        [
            unit_rows(encode_text(tokenizer(texts[i : i + TEXT_BATCH]).to(device)))
            for i in range(0, len(texts), TEXT_BATCH)
        ]
    )
    # a mean of unit vectors is shorter than one: normalised again so that every class weighs the same
    return F.normalize(embeddings.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """top-1, top-5 (with at least 5 classes) and mean per-class recall (the mean over classes present in ``labels``).

    Ties go to the lower class index, as with ``argmax``.
    """
    num_classes = logits.shape[1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); got {labels.min().item()}..{labels.max().item()}")
    per_class = multiclass_recall(logits, labels, num_classes, average="none")
    metrics = {
        "top1": multiclass_accuracy(logits, labels, num_classes, average="micro").item(),
        # over the classes with samples, as CLIP_benchmark's balanced_accuracy_score: torchmetrics' macro average
        # would also count a class that is only predicted, at recall 0
        "mean_per_class_recall": per_class[torch.unique(labels)].mean().item(),
    }
    if num_classes >= 5:
        # not torchmetrics' top_k: it orders tied logits as torch.topk does, which no device promises
        ranks = first_positive_rank(logits, F.one_hot(labels, num_classes).bool())
        metrics["top5"] = hit_rate(ranks, 5)
    return metrics
