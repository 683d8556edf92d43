"""rayseg: distributed batch image segmentation on Ray."""

__version__ = "0.1.0"
