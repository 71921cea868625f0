"""open_clip dual encoders, tokenizers and preprocessing, by registry name or by a config shipped here."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
from torch import nn

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass
class CLIPBundle:
    """An open_clip model with the preprocessing and tokenizer that belong to it."""

    name: str
    model: nn.Module
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable


def create_clip(
    name: str,
    pretrained: str | None = None,
    augmentation: dict[str, Any] | None = None,
    grad_checkpointing: bool = False,
    compile: bool = False,
    **model_kwargs,
) -> CLIPBundle:
    """Build ``name`` from open_clip's registry (which includes ``psdclip/model_configs``).

    ``pretrained`` is a local weights file or an open_clip pretrained tag; the default ``None`` means
    random initialisation, the only option without hub access. ``augmentation`` is open_clip's
    AugmentationCfg for the training transform. ``compile`` wraps the forward in ``torch.compile`` in place
    (parameter names, hence checkpoints, are unchanged).
    """
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown model {name!r}: not in open_clip's registry nor in {MODEL_CONFIG_DIR}. "
            f"Known names include {', '.join(open_clip.list_models()[:12])}, ... (see open_clip.list_models())"
        )
    if pretrained and Path(pretrained).suffix and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {pretrained}")
    model, train_transform, eval_transform = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, aug_cfg=dict(augmentation or {}), output_dict=True, **model_kwargs
    )
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if compile:
        model.compile()
    return CLIPBundle(name, model, train_transform, eval_transform, open_clip.get_tokenizer(name))
