from psdclip.data.datamodule import ShardDataModule
from psdclip.data.embedded import EmbeddedDataModule

__all__ = ["EmbeddedDataModule", "ShardDataModule"]
