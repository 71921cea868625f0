"""open_clip dual encoders, tokenizers and preprocessing, by registry name or by a config shipped here."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

from psdclip.run.checkpoint_files import load_checkpoint_file
from psdclip.run.quiet import quiet_libraries

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
# open_clip's cap on the learnt temperature: logits at most 100 × cosine similarity
MAX_LOGIT_SCALE = math.log(100.0)
# where a psdclip training checkpoint keeps each set of open_clip weights
CHECKPOINT_WEIGHTS = {"student": "model.", "ema": "teacher.model."}
open_clip.add_model_config(MODEL_CONFIG_DIR)
quiet_libraries()  # every entry point builds its models through here


class NormalizedEncoders:
    """L2-normalised ``encode_image``/``encode_text`` of ``self.model`` (an open_clip model): what training,
    evaluation, the media and the audit encode with."""

    model: nn.Module

    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens, normalize=True)


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
    AugmentationCfg for the training transform; an option set to None keeps open_clip's default. ``compile``
    wraps the forward in ``torch.compile`` in place (parameter names, hence checkpoints, are unchanged).
    """
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown model {name!r}: not in open_clip's registry nor in {MODEL_CONFIG_DIR}. "
            f"Known names include {', '.join(open_clip.list_models()[:12])}, ... (see open_clip.list_models())"
        )
    local = bool(pretrained) and bool(Path(pretrained).suffix)
    if local and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {pretrained}")
    own_state = None
    if local and Path(pretrained).suffix == ".ckpt":  # a train.py checkpoint: its student weights, if they fit
        held, own_state = read_checkpoint(pretrained)
        if held != name:
            raise ValueError(architecture_mismatch(pretrained, held, name))
    try:
        model, train_transform, eval_transform = open_clip.create_model_and_transforms(
            name,
            pretrained=None if own_state else pretrained,
            aug_cfg={key: value for key, value in (augmentation or {}).items() if value is not None},
            output_dict=True,
            **model_kwargs,
        )
    except (RuntimeError, AssertionError) as exn:  # open_clip's load: kilobytes of key lists, or a bare assertion
        if not local:
            raise
        raise ValueError(architecture_mismatch(pretrained, weights_architecture(pretrained), name)) from exn
    if own_state:
        model.load_state_dict(own_state)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if compile:
        model.compile()
    return CLIPBundle(name, model, train_transform, eval_transform, open_clip.get_tokenizer(name))


def architecture_mismatch(path: str | Path, held: str | None, asked: str) -> str:
    """One line saying that the weights in ``path`` belong to ``held`` (None: unknown), not to ``asked``."""
    holds = (
        f"a {held} model"
        if held
        else "weights of another architecture (none of open_clip's built-in ones matches them)"
    )
    fix = f"set model.name={held}" if held else "set model.name to the architecture they were trained with"
    return f"{path} holds {holds}, but model.name={asked} was asked: {fix}"


def weights_architecture(path: str | Path) -> str | None:
    """The registry name whose parameters have exactly the shapes of the open_clip weights in ``path``, or None.

    Candidates agreeing on the embedding, image-patch and token-embedding sizes are built on the meta device (no
    memory, no initialisation) and compared key by key; timm and Hugging Face towers are left out, since building
    them may download. This only words an error, so a candidate that fails to build is passed over.
    """
    shapes = {key: tuple(value.shape) for key, value in open_clip.factory.load_state_dict(str(path)).items()}

    def plausible(config: dict) -> bool:
        vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
        expected = {
            "text_projection": (text.get("width"), config.get("embed_dim")),
            "visual.conv1.weight": (vision.get("width"), 3, vision.get("patch_size"), vision.get("patch_size")),
            "token_embedding.weight": (text.get("vocab_size", 49408), text.get("width")),
        }
        return all(shapes.get(key, shape) == shape for key, shape in expected.items())

    for name in open_clip.list_models():
        config = open_clip.get_model_config(name) or {}
        if (
            "timm_model_name" in config.get("vision_cfg", {})
            or "hf_model_name" in config.get("text_cfg", {})
            or not plausible(config)
        ):
            continue
        try:
            with torch.device("meta"):
                model = open_clip.create_model(name, device="meta")
        except Exception:  # noqa: BLE001, S112 - a config that cannot be built is not the checkpoint's architecture
            continue
        if {key: tuple(value.shape) for key, value in model.state_dict().items()} == shapes:
            return name
    return None


def read_checkpoint(path: str | Path, weights: str = "student") -> tuple[str, dict[str, Tensor]]:
    """The model name and open_clip state dict (``student`` or ``ema`` teacher) of a ``train.py`` checkpoint."""
    if weights not in CHECKPOINT_WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose one of {sorted(CHECKPOINT_WEIGHTS)}")
    checkpoint = load_checkpoint_file(path)
    hyper_parameters = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    name = hyper_parameters.get("model_name") if isinstance(hyper_parameters, dict) else None
    if name is None or "state_dict" not in checkpoint:
        raise ValueError(
            f"{path} is not a psdclip training checkpoint (no hyper_parameters.model_name / state_dict); "
            "for open_clip weights give the model name and pretrained weights instead"
        )
    prefix = CHECKPOINT_WEIGHTS[weights]
    # torch.compile'd models keep their weights under _orig_mod.
    state = {
        key[len(prefix) :].replace("_orig_mod.", ""): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(prefix)
    }
    if not state:
        raise ValueError(
            f"{path} holds no {weights} weights (keys starting with {prefix!r}); was it trained with teacher=ema?"
        )
    return name, state


def load_clip_checkpoint(path: str | Path, weights: str = "student") -> CLIPBundle:
    """The trained model of a ``train.py`` checkpoint, with its preprocessing and tokenizer, in eval mode."""
    name, state = read_checkpoint(path, weights)
    clip = create_clip(name)
    clip.model.load_state_dict(state)
    clip.model.eval()
    return clip
