"""Attribution: how much of an answer came from the prompt, the image and the model's prior.

Example:
    >>> split = lp.attribution.source_split(model, batch, target="yes", foil="no")
    >>> split.shares()      # prior, prompt, image, full per example
    >>> split.plot()
    >>> lp.attribution.logit_lens(model, batch, positions="image", k=5).tokens(layer=-1, example=0)
"""
from __future__ import annotations

from .dla import DirectLogitAttribution, dla
from .faithfulness import deletion_insertion, randomization_check
from .groups import GROUPS
from .image_map import METHODS, ImageMap, image_map
from .knockout import knockout
from .lens import LogitLens, logit_lens
from .source_split import COALITIONS, SourceSplit, source_split

__all__ = ["COALITIONS", "GROUPS", "METHODS", "DirectLogitAttribution", "ImageMap", "LogitLens", "SourceSplit",
           "deletion_insertion", "dla", "image_map", "knockout", "logit_lens", "randomization_check",
           "source_split"]
