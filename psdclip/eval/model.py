"""The encoders to evaluate, from our Lightning checkpoint or an open_clip model name with weights."""

from pathlib import Path

from torch import nn

from psdclip.models import (
    CLIPBundle,
    NormalizedEncoders,
    architecture_mismatch,
    create_clip,
    load_clip_checkpoint,
)


class CLIPEncoders(NormalizedEncoders, nn.Module):
    """``encode_image``/``encode_text`` (L2-normalised), ``tokenizer`` and ``eval_transform`` — what the suite needs."""

    def __init__(self, clip: CLIPBundle):
        super().__init__()
        self.name, self.model = clip.name, clip.model
        self.tokenizer, self.eval_transform = clip.tokenizer, clip.eval_transform


def load_checkpoint(path: str | Path) -> CLIPEncoders:
    """A checkpoint written by ``python train.py``: the model named in its hyperparameters, with its weights."""
    return CLIPEncoders(load_clip_checkpoint(path))


def load_encoders(ckpt: str | None = None, name: str | None = None, pretrained: str | None = None) -> CLIPEncoders:
    """From ``ckpt`` (ours) or else open_clip's ``name`` with ``pretrained`` weights (a local file or tag)."""
    if ckpt:
        encoders = load_checkpoint(ckpt)
        if name and name != encoders.name:  # the checkpoint names its architecture; a different one asked is a mistake
            raise ValueError(architecture_mismatch(ckpt, encoders.name, name))
        return encoders
    if not name:
        raise ValueError(
            "give ckpt=<checkpoint from train.py> or model.name=<open_clip model> (with model.pretrained=<weights>)"
        )
    return CLIPEncoders(create_clip(name, pretrained))
