"""segstudy: a reproducible study of semantic segmentation of urban street scenes."""

__version__ = "0.1.0"
