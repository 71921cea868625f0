import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from psdclip.models import create_clip
from tests.conftest import compose_config


def test_tiny_model_and_matching_tokenizer():
    clip = create_clip("psdclip-vit-tiny")
    tokens = clip.tokenizer(["a photo of a sneaker."])
    assert tokens.shape == (1, clip.model.context_length)
    out = clip.model(torch.randn(2, 3, 28, 28), clip.tokenizer(["a bag.", "a coat."]))
    assert out["image_features"].shape == out["text_features"].shape == (2, 128)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(2))
    assert torch.isclose(out["logit_scale"], torch.tensor(1 / 0.07))


def test_local_pretrained_weights_are_loaded(tmp_path):
    source = create_clip("psdclip-vit-tiny").model
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    loaded = create_clip("psdclip-vit-tiny", pretrained=str(path)).model
    for (name, expected), actual in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(expected, actual), name


def test_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-99'"):
        create_clip("ViT-Q-99")


def test_missing_weights_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained weights file not found"):
        create_clip("psdclip-vit-tiny", pretrained=str(tmp_path / "nope.pt"))


def train_transform_steps(overrides: list[str], kind: str) -> list:
    """The training transform's steps of class ``kind`` (torchvision's or timm's) under ``overrides``."""
    transform = instantiate(compose_config(["model=vit_tiny", *overrides]).model).train_transform
    return [step for step in transform.transforms if type(step).__name__ == kind]


def test_augmentation_options_reach_open_clips_training_transform():
    (default,) = train_transform_steps([], "RandomResizedCrop")
    assert default.scale == (0.9, 1.0)  # open_clip's own default: every option unset
    (wider,) = train_transform_steps(["model.augmentation.scale=[0.5,1.0]"], "RandomResizedCrop")
    assert tuple(wider.scale) == (0.5, 1.0)
    timm = ["model.augmentation={use_timm: true, re_prob: 0.25, scale: [0.5, 1.0]}"]
    (erasing,) = train_transform_steps(timm, "RandomErasing")
    assert erasing.probability == 0.25
    assert train_transform_steps([], "RandomErasing") == []


def test_a_misspelt_augmentation_option_is_refused():
    with pytest.raises(ConfigCompositionException, match="scal"):
        compose_config(["model.augmentation.scal=[0.5,1.0]"])
