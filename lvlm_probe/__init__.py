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
                     circuits,
                     distributed,  # registers the "ray" backends; imports no Ray
                     errors,
                     families,
                     interop,
                     probing,
                     report,
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
                     ModelLoadError,
                     StoreError,
                     UnsupportedModelError,
)
from .inputs import Batch
from .interop.loading import load
from .layout import ImageGrid, ImageLayout, TokenLayout
from .model import LVLM, Generation
from .store import ActivationStore, extract

__version__ = "0.1.0"


def __getattr__(name: str):
    # widgets (ipywidgets) loads on first use: it costs no import otherwise.
    if name == "widgets":
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LVLM", "Batch", "Generation", "TokenLayout", "ImageLayout", "ImageGrid", "load", "families", "zoo", "errors",
    "worlds", "bench", "store", "extract", "ActivationStore", "alignment", "interop", "viz", "probing", "attribution",
    "circuits", "report", "widgets", "distributed",
    "LVLMProbeError", "UnsupportedModelError", "InputError", "ImageTypeError", "LayoutError",
    "HookNameError", "StoreError", "ModelLoadError", "__version__",
]
