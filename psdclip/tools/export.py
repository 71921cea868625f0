"""Export a training checkpoint as an open_clip model folder: `python -m psdclip.tools.export ckpt=... out=...`
(settings: ``conf/export.yaml``).

The folder holds ``open_clip_config.json`` (model_cfg + preprocess_cfg, open_clip's hub layout),
``open_clip_model.safetensors`` and ``<model name>.json`` (the bare model config), so any of these work:

    open_clip.create_model_and_transforms("local-dir:OUT")                       # config + weights
    open_clip.create_model_and_transforms("ViT-B-32", pretrained="OUT/open_clip_model.safetensors")
    open_clip.add_model_config("OUT/psdclip-vit-tiny.json")                        # names open_clip lacks
    open_clip.create_model_and_transforms("psdclip-vit-tiny", pretrained="OUT/open_clip_model.safetensors")

``weights=student`` (default) or ``weights=ema`` (the EMA teacher, when trained with one).
"""

import json
from pathlib import Path

import hydra
import open_clip
from omegaconf import DictConfig
from safetensors.torch import save_file

from psdclip.models import (
    read_checkpoint,  # importing it registers psdclip/model_configs with open_clip
)
from psdclip.run.cli import reported_errors

CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"


def export(ckpt: str | Path, out: str | Path, weights: str = "student") -> Path:
    """Write ``ckpt``'s open_clip weights and config to the folder ``out``; returns it."""
    name, state = read_checkpoint(ckpt, weights)
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"{ckpt}: model {name!r} unknown to open_clip; was it trained with a config that is gone?")
    state = {key: value.contiguous() for key, value in state.items()}  # safetensors stores contiguous tensors

    model = open_clip.create_model(name, output_dict=True)
    model.load_state_dict(state)  # fails loudly if config and weights disagree
    preprocess = dict(model.visual.preprocess_cfg)  # image size, mean/std, interpolation, resize mode
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2))
    (out / f"{name}.json").write_text(json.dumps(model_cfg, indent=2))
    return out


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        folder = export(cfg.ckpt, cfg.out, cfg.weights)
    print(f"exported to {folder}; load with open_clip.create_model_and_transforms('local-dir:{folder}')")


if __name__ == "__main__":
    main()
