"""psdclip: CLIP-style image–text training with progressive self-distillation."""

__version__ = "0.1.0"
