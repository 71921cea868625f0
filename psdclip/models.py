"""open_clip dual encoders, tokenizers and preprocessing, by registry name or by a config shipped here."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from torch import Tensor, nn

from psdclip.checkpointing import check_complete

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
# where a psdclip training checkpoint keeps each set of open_clip weights
CHECKPOINT_WEIGHTS = {"student": "model.", "ema": "teacher.average.module."}
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


def read_checkpoint(path: str | Path, weights: str = "student") -> tuple[str, dict[str, Tensor]]:
    """The model name and open_clip state dict (``student`` or ``ema`` teacher) of a ``train.py`` checkpoint."""
    if weights not in CHECKPOINT_WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose one of {sorted(CHECKPOINT_WEIGHTS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    check_complete(path)  # a truncated file: its name and the newest good one beside it, not torch's zip error
    # Lightning checkpoints hold more than tensors (loop and callback states): load only files you trust
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    name = checkpoint.get("hyper_parameters", {}).get("model_name")
    if name is None or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a psdclip training checkpoint (no hyper_parameters.model_name / state_dict); "
                         "for open_clip weights give the model name and pretrained weights instead")
    prefix = CHECKPOINT_WEIGHTS[weights]
    # torch.compile'd models keep their weights under _orig_mod.
    state = {key[len(prefix):].replace("_orig_mod.", ""): value
             for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    if not state:
        raise ValueError(f"{path} holds no {weights} weights (keys starting with {prefix!r}); was it trained with teacher=ema?")
    return name, state


def load_clip_checkpoint(path: str | Path, weights: str = "student") -> CLIPBundle:
    """The trained model of a ``train.py`` checkpoint, with its preprocessing and tokenizer, in eval mode."""
    name, state = read_checkpoint(path, weights)
    clip = create_clip(name)
    clip.model.load_state_dict(state)
    clip.model.eval()
    return clip
