"""Tiny InstructBlipForConditionalGeneration: BLIP vision tower, instruction-aware Q-Former
(4 queries), Llama (Vicuna) LM.

The processor tokenizes the text twice: with the language model's tokenizer (after
``NUM_QUERY_TOKENS`` ``<image>`` placeholders, which the processor adds itself) and with the
Q-Former's own BERT WordPiece tokenizer (``qformer_input_ids``), so the queries read the instruction
as well as the image. Both tokenizers are made here offline from the shared corpus: the Q-Former's is
a lowercase WordPiece vocabulary in the real ``BertTokenizer``.

transformers initialises the learned query tokens to zeros, and the vision tower with the config's
``initializer_range`` of 1e-10: its states then sit far below its LayerNorms' epsilon, and the
Q-Former's queries (once drawn) read the same nothing from every image. The builder draws the query
tokens and the vision tower at the Q-Former's scale (0.02), so the image reaches the language model.
"""
from __future__ import annotations

import string

import torch
from tokenizers import pre_tokenizers
from transformers import (
    BertTokenizer,
    BlipImageProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
)

from .sizes import IMAGE_SIZE, PATCH_SIZE, TEXT, VISION
from .tokenizer import _corpus, build_tokenizer

FAMILY = "instructblip"
NUM_QUERY_TOKENS = 4
QFORMER_INIT = 0.02
QFORMER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] first: the Q-Former's pad id is 0


def build_qformer_tokenizer() -> BertTokenizer:
    """A lowercase BERT WordPiece tokenizer (bert-base-uncased's special tokens) over the corpus.

    The vocabulary is every word of the corpus plus every character, alone and as a ``##``
    continuation, so any English prompt tokenizes; listed in sorted order, so builds are identical
    (the ``tokenizers`` WordPiece trainer breaks ties differently from run to run).
    """
    words = set()
    for line in _corpus():
        words.update(word for word, _ in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(line.lower()))
    chars = {c for c in string.printable if not c.isspace() and not c.isupper()}
    pieces = sorted(words | chars) + sorted("##" + c for c in chars)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(QFORMER_SPECIALS + pieces))}
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def build():
    # Salesforce/instructblip-vicuna-7b's LM tokenizer: "</s>" is BOS, EOS and UNK, "[PAD]" pads,
    # BOS is prepended. No image_token is named: the processor adds "<image>" itself.
    tokenizer = build_tokenizer(
        ["</s>", "[PAD]"], bos_token="</s>", eos_token="</s>", pad_token="[PAD]", unk_token="</s>",
        add_bos=True,
    )
    qformer_tokenizer = build_qformer_tokenizer()
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = InstructBlipProcessor(
        image_processor=image_processor, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=NUM_QUERY_TOKENS,
    )
    # Read after the processor has added <image>, so the vocabulary covers it.
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = InstructBlipConfig(
        # drawn at the Q-Former's scale (see the module docstring)
        vision_config=InstructBlipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                               initializer_range=QFORMER_INIT, **VISION),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(qformer_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, cross_attention_frequency=1, max_position_embeddings=128,
            encoder_hidden_size=VISION["hidden_size"], pad_token_id=qformer_tokenizer.pad_token_id,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT,
        ),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
    )
    config.architectures = ["InstructBlipForConditionalGeneration"]
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # zeros from transformers (see the module docstring)
        model.query_tokens.normal_(std=QFORMER_INIT)
    return model, processor
