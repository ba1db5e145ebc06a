"""Attribution: how much of an answer came from the prompt, the image and the model's prior.

Example:
    >>> split = lp.attribution.source_split(model, batch, target="yes", foil="no")
    >>> split.shares()      # prior, prompt, image, full per example
    >>> split.plot()
"""
from __future__ import annotations

from .source_split import COALITIONS, SourceSplit, source_split

__all__ = ["COALITIONS", "SourceSplit", "source_split"]
