"""Features of one evaluation split, computed once (batched, no_grad, in the run's precision) and gathered from every rank.

The model's ``encode_image``/``encode_text`` L2-normalise (``psdclip.models.NormalizedEncoders`` owns that);
``unit_rows`` only makes their output exact in fp32, in one place.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

TEXT_BATCH = 256  # captions or prompts encoded at once


def unit_rows(features: Tensor) -> Tensor:
    """Encoder output as fp32 rows of length one, what every metric compares.

    psdclip's encoders normalise already, but under reduced-precision autocast their unit vectors are rounded (bf16 on
    CPU: lengths off by ~0.3%), which would tilt the similarity scores that rank candidates; and a model handed to
    the suite from elsewhere need not normalise at all.
    """
    return F.normalize(features.float(), dim=-1)


@dataclass
class Runtime:
    """Where and how evaluation runs: device, precision context and, under DDP, the ranks to split work across.

    ``all_gather`` is Lightning's (``LightningModule.all_gather`` / ``Fabric.all_gather``): it stacks each rank's
    equally shaped tensor along a new first dimension.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    rank: int = 0
    world_size: int = 1
    all_gather: Callable[[Tensor], Tensor] | None = None
    # called before each batch; raises to abandon the evaluation (training's callback does on SIGTERM)
    check_stop: Callable[[], None] = lambda: None

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's rows, in rank order (ranks may hold different numbers of rows)."""
        if self.world_size == 1:
            return tensor
        # every dimension, not just the rows: a rank with nothing to encode holds a (0, 0) placeholder, and
        # all_gather needs the same shape everywhere (a smaller tensor desynchronises the ranks' collectives)
        shapes = self.all_gather(torch.tensor(tensor.shape, device=self.device)).cpu()
        padded = tensor.new_zeros(shapes.max(dim=0).values.tolist())
        padded[tuple(slice(0, size) for size in tensor.shape)] = tensor
        gathered = self.all_gather(padded.to(self.device)).cpu()
        return torch.cat([gathered[rank, :size] for rank, size in enumerate(shapes[:, 0].tolist())])


@dataclass
class SplitFeatures:
    """L2-normalised image features with their labels and, for retrieval, caption features with their image index."""

    images: Tensor
    labels: Tensor
    texts: Tensor | None = None
    text_to_image: Tensor | None = None


@torch.no_grad()
def encode_texts(model, texts: list[str], runtime: Runtime) -> Tensor:
    """L2-normalised embeddings of ``texts``; each distinct string is encoded once."""
    unique = list(dict.fromkeys(texts))
    chunks = []
    for start in range(0, len(unique), TEXT_BATCH):
        with runtime.autocast():
            chunks.append(
                unit_rows(
                    model.encode_text(model.tokenizer(unique[start : start + TEXT_BATCH]).to(runtime.device))
                ).cpu()
            )
    embeddings = torch.cat(chunks) if chunks else torch.zeros(0, 0)
    position = {text: i for i, text in enumerate(unique)}
    return embeddings[[position[text] for text in texts]]


@torch.no_grad()
def split_features(model, batches, runtime: Runtime, with_captions: bool = False) -> SplitFeatures:
    """Encode a split's images (and captions) on this rank's share, then gather all ranks' features."""
    images, labels, captions, caption_image = [], [], [], []
    count = 0
    for batch_images, batch_labels, batch_captions in batches:
        runtime.check_stop()
        with runtime.autocast():
            images.append(unit_rows(model.encode_image(batch_images.to(runtime.device))).cpu())
        labels.append(batch_labels)
        if with_captions:
            for offset, texts in enumerate(batch_captions):
                captions += texts
                caption_image += [count + offset] * len(texts)
        count += len(batch_images)
    local = torch.cat(images) if images else torch.zeros(0, 0)
    features = SplitFeatures(
        runtime.gather_rows(local),
        runtime.gather_rows(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)),
    )
    if with_captions:
        counts = runtime.gather_rows(torch.tensor([count]))
        offset = int(counts[: runtime.rank].sum())
        features.texts = runtime.gather_rows(encode_texts(model, captions, runtime))
        features.text_to_image = runtime.gather_rows(torch.tensor(caption_image, dtype=torch.long) + offset)
    return features
