"""layercut: cut contiguous blocks of decoder layers out of a language model and repair the cut."""

__version__ = "0.1.0"
