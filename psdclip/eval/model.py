"""The encoders to evaluate, from our Lightning checkpoint or an open_clip model name with weights."""

from pathlib import Path

import torch
from torch import Tensor, nn

from psdclip.models import CLIPBundle, create_clip

STATE_PREFIX = "model."  # PSDCLIPModule keeps the open_clip model as ``self.model``


class CLIPEncoders(nn.Module):
    """``encode_image``/``encode_text`` (L2-normalised), ``tokenizer`` and ``eval_transform`` — what the suite needs."""

    def __init__(self, clip: CLIPBundle):
        super().__init__()
        self.name, self.model = clip.name, clip.model
        self.tokenizer, self.eval_transform = clip.tokenizer, clip.eval_transform

    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens, normalize=True)


def load_checkpoint(path: str | Path) -> CLIPEncoders:
    """A checkpoint written by ``python train.py``: the model named in its hyperparameters, with its weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # train.py's hyperparameters are OmegaConf containers, which weights_only loading refuses: load only trusted files
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    name = checkpoint.get("hyper_parameters", {}).get("model_name")
    if name is None:
        raise ValueError(f"{path} has no hyper_parameters.model_name: not a psdclip training checkpoint "
                         "(for open_clip weights give model.name and model.pretrained instead)")
    clip = create_clip(name)
    state = {key[len(STATE_PREFIX):]: value for key, value in checkpoint["state_dict"].items() if key.startswith(STATE_PREFIX)}
    clip.model.load_state_dict(state)
    return CLIPEncoders(clip)


def load_encoders(ckpt: str | None = None, name: str | None = None, pretrained: str | None = None) -> CLIPEncoders:
    """From ``ckpt`` (ours) or else open_clip's ``name`` with ``pretrained`` weights (a local file or tag)."""
    if ckpt:
        return load_checkpoint(ckpt)
    if not name:
        raise ValueError("give ckpt=<checkpoint from train.py> or model.name=<open_clip model> (with model.pretrained=<weights>)")
    return CLIPEncoders(create_clip(name, pretrained))
