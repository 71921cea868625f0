import pytest
import torch

from psdclip.models import create_clip


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
