"""SmolVLM (``SmolVLMForConditionalGeneration``): Idefics3's architecture with a SmolLM2 (Llama) LM.

Images are laid out exactly as Idefics3's: split crops marked ``<row_i_col_j>`` plus a
``<global-img>`` view, ``image_seq_len`` tokens each; see :mod:`lvlm_probe.families.idefics3`.
"""
from __future__ import annotations

from .idefics3 import Idefics3


class SmolVLM(Idefics3):
    name = "smolvlm"
    hf_classes = ("SmolVLMForConditionalGeneration",)
    model_types = ("smolvlm",)
