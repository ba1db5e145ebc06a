"""Attribution: how much of an answer came from the prompt, the image and the model's prior.

Every method that scores a target is called ``f(model, batch, target, *, foil=None, ...)`` and
returns an :class:`AttributionResult` (``to_frame()``, ``plot()``, the scored targets and foils,
the layouts); see :mod:`lvlm_probe.attribution.results`.

Example:
    >>> split = lp.attribution.source_split(model, batch, target="yes", foil="no")
    >>> split.shares()      # prior, prompt, image, full per example
    >>> split.plot()
    >>> lp.attribution.logit_lens(model, batch, positions="image", k=5).tokens(layer=-1, example=0)
    >>> lp.attribution.explain_generation(model, batch, max_new_tokens=12).plot()  # per generated token
"""
from __future__ import annotations

from .attention_knockout import KnockoutCurve, knockout
from .direct_logit import DirectLogitAttribution, dla
from .faithfulness import (
           DeletionInsertion,
           RandomizationCheck,
           deletion_insertion,
           randomization_check,
)
from .generation import GenerationSplit, explain_generation, teacher_forced
from .groups import GROUPS
from .image_maps import METHODS, ImageMap, image_map
from .lens import LogitLens, logit_lens
from .results import AttributionResult, AttributionTable
from .sources import COALITIONS, SourceSplit, source_split

__all__ = ["COALITIONS", "GROUPS", "METHODS", "AttributionResult", "AttributionTable", "DeletionInsertion",
           "DirectLogitAttribution", "GenerationSplit", "ImageMap", "KnockoutCurve", "LogitLens", "RandomizationCheck",
           "SourceSplit", "deletion_insertion", "dla", "explain_generation", "image_map", "knockout", "logit_lens",
           "randomization_check", "source_split", "teacher_forced"]
