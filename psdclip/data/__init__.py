from psdclip.data.datamodule import ShardDataModule
from psdclip.data.embedded import EmbeddedDataModule
from psdclip.data.mosaic import MosaicDataModule

__all__ = ["EmbeddedDataModule", "MosaicDataModule", "ShardDataModule"]
