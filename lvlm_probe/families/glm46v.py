"""GLM-4.6V (``Glm46VForConditionalGeneration``): GLM-4.1V's architecture as its own model type.
``Glm46VModel`` builds its vision tower and language model from the ``vision_config`` and
``text_config`` sub-configs through the auto classes; with the ``glm4v_vision`` and ``glm4v_text``
types (GLM-4.6V-Flash) these are GLM-4.1V's modules at GLM-4.1V's paths, so the module paths, the
sandwich-norm writes and the token layout are GLM-4.1V's (see ``glm4v``). What differs is outside
the layout: the processor classes (timestamps of video frames), the video boundary token ids and
the chat template (the assistant's turn opens without a newline).

A mixture-of-experts text config (``glm4v_moe_text``) builds a different decoder layer, whose norms
are not the ones named here; this adapter describes the dense language model.
"""
from __future__ import annotations

from .glm4v import Glm4v


class Glm46V(Glm4v):
    name = "glm46v"
    hf_classes = ("Glm46VForConditionalGeneration",)
    model_types = ("glm46v",)
