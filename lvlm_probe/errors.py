"""The exceptions lvlm_probe raises.

Every error the library raises on bad input is a subclass of :class:`LVLMProbeError` (or a plain
``ValueError``/``TypeError`` subclass of it), and its message names the value received and what was
expected, so a user can fix the call without reading the source.
"""
from __future__ import annotations


class LVLMProbeError(Exception):
    """Root of every exception raised by lvlm_probe."""


class UnsupportedModelError(LVLMProbeError, ValueError):
    """A model, config or family that no adapter supports."""


class InputError(LVLMProbeError, ValueError):
    """Images, prompts or options passed to a public function do not fit together."""


class ImageTypeError(LVLMProbeError, TypeError):
    """An image of a type the processors cannot take."""


class LayoutError(LVLMProbeError, ValueError):
    """The token layout of a processed example could not be derived, or a position group is unknown."""


class HookNameError(LVLMProbeError, KeyError):
    """A hook name that the model does not offer."""

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class StoreError(LVLMProbeError, RuntimeError):
    """An activation store that is missing, incomplete or corrupted."""


class ModelLoadError(LVLMProbeError, OSError):
    """A checkpoint that could not be read."""


class FileWriteError(LVLMProbeError, OSError):
    """A file that could not be written; its previous content (or absence) is kept."""


class MissingDependencyError(LVLMProbeError, ImportError):
    """An optional dependency that a requested feature needs is not installed."""


class PackageInstallError(LVLMProbeError, RuntimeError):
    """Code run by lvlm_probe tried to install a package; the installer was not started."""
