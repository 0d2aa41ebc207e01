"""cellmap-repro: reproducible CellMap Segmentation Challenge experiments."""

__version__ = "0.1.0"
