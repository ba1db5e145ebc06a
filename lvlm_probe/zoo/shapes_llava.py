"""shapes-llava: a standard ``LlavaForConditionalGeneration`` trained on ShapesWorld.

This module holds the recipe (world settings, architecture, optimisation) and builds the untrained
model, tokenizer and processor from it; :mod:`lvlm_probe.zoo.train` trains it. The recipe that
produced the shipped checkpoint is saved beside it as ``recipe.json``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
)

from ..worlds import ShapesWorld
from ..worlds.evaluation import CAPTION_PROMPT
from .tiny_builders.tokenizer import build_tokenizer

NAME = "shapes-llava"
COMMAND = "lvlm-probe zoo train shapes-llava"

# The tasks of the training stream (see ShapesWorld.training_questions), repeated to weight them.
# Absent shapes are drawn uniformly (POPE's random mode) as a plain training set would hold them:
# a model that rarely sees a present shape's usual partner asked about while absent can fall back
# on the co-occurrence prior, which POPE's adversarial questions then expose. Relations, the
# hardest level, get as large a share as attributes.
TRAINING_TASKS: tuple[tuple[str, str, str | None], ...] = (
    *(("object", "exist", "random"),) * 3,
    ("attribute", "color", None),
    ("attribute", "size", None),
    *(("attribute", "color_yesno", None),) * 2,
    *(("relation", "relation_yesno", None),) * 2,
    *(("relation", "where", None),) * 2,
)

# LLaVA's chat format with the question before the image, an order LLaVA's own instruction data
# uses too: every image token can then attend to the question, so a model this small learns to
# match the asked shape at the image tokens themselves instead of only at the answer position.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + '\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% if message['role'] != 'user' %}{{ ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a shapes-llava training run.

    Attributes:
        seed: seed of the weights' initialisation and of the training stream's world.
        world: keyword arguments of :class:`~lvlm_probe.worlds.ShapesWorld` for the training stream
            (the priors it teaches live here).
        steps, batch_size, lr, warmup, weight_decay: optimisation.
        vision, text: CLIP vision tower and Llama language model sizes.
        caption_rate: share of stage-2 batches that ask for captions instead of answers (whole
            batches, so short answers are not padded to a caption's length).
        tasks: the question tasks of the training stream, ``(level, kind, pope mode)``.
        answer_heads_layer, answer_heads_weight: where the auxiliary answer-position heads read
            and the weight of their loss (0 = none); see :mod:`lvlm_probe.zoo.answer_heads`.
        vision_steps, vision_batch_size, vision_lr: stage 1, per-patch pre-training of the vision
            tower (see :mod:`lvlm_probe.zoo.vision_pretrain`).
        vision_shape_weight: weight of the shape label in stage 1's loss (the others weigh 1).
        vision_world: overrides of ``world`` for stage 1's scenes (e.g. another colour prior, so
            the vision tower does not learn the one stage 2 teaches the language model).
        position_code: also align each projected patch's position with the relation words.
        projector_alignment_weight: weight of stage 1's projector alignment loss in stage 2 as well
            (0 = stage 1 only); it keeps the image tokens on the words' embeddings, which stage 2's
            answers alone move them off.
        vocab_size: BPE vocabulary size of the tokenizer trained on the world's corpus.
    """

    seed: int = 0
    world: dict[str, Any] = field(default_factory=lambda: dict(
        image_size=64, max_objects=4, p_typical_color=0.85, p_cooccur=0.8))
    steps: int = 4400
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.01
    vision: dict[str, int] = field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        patch_size=16))
    text: dict[str, int] = field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256))
    vocab_size: int = 400
    caption_rate: float = 0.25
    vision_steps: int = 1500
    vision_batch_size: int = 64
    vision_lr: float = 2e-3
    vision_shape_weight: float = 1.0
    vision_world: dict[str, Any] = field(default_factory=dict)
    position_code: bool = False
    projector_alignment_weight: float = 0.0
    tasks: tuple[tuple[str, str, str | None], ...] = TRAINING_TASKS
    answer_heads_layer: int = 2
    answer_heads_weight: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        if "tasks" in fields:  # JSON lists back to the tuples the default holds
            fields["tasks"] = tuple(tuple(task) for task in fields["tasks"])
        return cls(**fields)

    def training_world(self) -> ShapesWorld:
        return ShapesWorld(seed=self.seed, **self.world)

    def vision_training_world(self) -> ShapesWorld:
        """Stage 1's world: ``world`` with ``vision_world``'s overrides."""
        return ShapesWorld(seed=self.seed, **{**self.world, **self.vision_world})


def build_untrained(recipe: Recipe) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The randomly initialised model and its processor (call under a seeded RNG)."""
    world = recipe.training_world()
    tokenizer = build_tokenizer(
        ["<image>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_attributes={"image_token": "<image>"}, add_bos=True, vocab_size=recipe.vocab_size,
        corpus=world.corpus() + [CAPTION_PROMPT] + ["USER: <image> ASSISTANT:"] * 50,
    )
    image_size = recipe.world["image_size"]
    vision = dict(recipe.vision)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_size, **vision),
        text_config=LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **recipe.text),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # a 4-layer tower has no spare layer to skip, unlike CLIP-L's -2
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=vision["patch_size"],
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor
