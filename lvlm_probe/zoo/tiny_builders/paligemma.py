"""Tiny PaliGemmaForConditionalGeneration: SigLIP vision tower, linear projector, Gemma LM.

PaliGemma has no chat template: its processor takes ``<image>`` tokens and the bare prompt, inserts
BOS after the last image token and appends a newline.
"""
from __future__ import annotations

from transformers import (
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "paligemma"


def build():
    # No BOS post-processor: the processor writes "<bos>" into the text itself.
    tokenizer = build_tokenizer(
        ["<image>"], bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_attributes={"image_token": "<image>"},
    )
    image_seq_length = (IMAGE_SIZE // PATCH_SIZE) ** 2
    image_processor = SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=image_seq_length
    )
    # The processor adds the 1024 <locXXXX> and 128 <segXXX> tokens, so the vocabulary is sized after it.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vocab = len(processor.tokenizer)
    text = GemmaConfig(
        vocab_size=vocab, head_dim=TEXT["hidden_size"] // TEXT["num_attention_heads"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT,
    )
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION),
        text_config=text,
        image_token_index=processor.image_token_id,
        vocab_size=vocab,
        projection_dim=TEXT["hidden_size"],
        hidden_size=TEXT["hidden_size"],
    )
    config.architectures = ["PaliGemmaForConditionalGeneration"]
    model = PaliGemmaForConditionalGeneration(config).eval()
    return model, processor
