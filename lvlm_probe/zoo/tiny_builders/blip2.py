"""Tiny Blip2ForConditionalGeneration: BLIP vision tower, Q-Former (4 queries), OPT LM."""
from __future__ import annotations

from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessor,
    OPTConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import build_tokenizer

FAMILY = "blip2"
NUM_QUERY_TOKENS = 4


def build():
    # OPT's tokenizer uses </s> as BOS and EOS and prepends it to every text. No image_token is named
    # on the tokenizer: Blip2Processor adds "<image>" itself when the tokenizer has none.
    tokenizer = build_tokenizer(
        ["<s>", "</s>", "<pad>", "<unk>"], bos_token="</s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", add_bos=True,
    )
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                               num_query_tokens=NUM_QUERY_TOKENS)
    # Read after the processor has added <image>, so the vocabulary covers it.
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = Blip2Config(
        vision_config=Blip2VisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION),
        qformer_config=Blip2QFormerConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, cross_attention_frequency=1, max_position_embeddings=64,
        ),
        text_config=OPTConfig(
            vocab_size=len(tokenizer), hidden_size=TEXT["hidden_size"],
            ffn_dim=TEXT["intermediate_size"], num_hidden_layers=TEXT["num_hidden_layers"],
            num_attention_heads=TEXT["num_attention_heads"], word_embed_proj_dim=TEXT["hidden_size"],
            max_position_embeddings=TEXT["max_position_embeddings"],
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
    )
    config.architectures = ["Blip2ForConditionalGeneration"]
    model = Blip2ForConditionalGeneration(config).eval()
    return model, processor
