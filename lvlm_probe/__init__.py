"""lvlm_probe: interpretability diagnostics for large vision-language models.

Example:
    >>> import lvlm_probe as lp
    >>> model = lp.zoo.tiny("llava")
    >>> batch = model.prepare(images=[img], prompts=["Is there a red heart?"])
    >>> model.answer_logprobs(batch, ["yes", "no"])
"""
from . import (
                     alignment,
                     attribution,
                     bench,
                     errors,
                     families,
                     interop,
                     probing,
                     store,
                     viz,
                     worlds,
                     zoo,
)
from .errors import (
                     HookNameError,
                     ImageTypeError,
                     InputError,
                     LayoutError,
                     LVLMProbeError,
                     StoreError,
                     UnsupportedModelError,
)
from .inputs import Batch
from .layout import ImageGrid, ImageLayout, TokenLayout
from .model import LVLM, ModelLoadError, load
from .store import ActivationStore, extract

__version__ = "0.1.0"

__all__ = [
    "LVLM", "Batch", "TokenLayout", "ImageLayout", "ImageGrid", "load", "families", "zoo", "errors",
    "worlds", "bench", "store", "extract", "ActivationStore", "alignment", "interop", "viz", "probing", "attribution",
    "LVLMProbeError", "UnsupportedModelError", "InputError", "ImageTypeError", "LayoutError",
    "HookNameError", "StoreError", "ModelLoadError", "__version__",
]
