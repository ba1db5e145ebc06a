"""A small byte-level BPE tokenizer, trained offline, for the tiny random-weight models.

Real checkpoints ship tokenizers of 32k-260k entries; the tiny models only need one that tokenizes
English prompts about ShapesWorld scenes sensibly and keeps each family's special tokens whole.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_SHAPES = ["circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon"]
_COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray"]
_RELATIONS = ["left of", "right of", "above", "below", "next to"]

_SENTENCES = [
    "Is there a {c} {s} in the image? Answer yes or no.",
    "What color is the {s}? It is {c}.",
    "Is the {c} {s} {r} the {s2}? Yes. No.",
    "Describe the image. There is a small {c} {s} and a large {c2} {s2}.",
    "USER: ASSISTANT: user assistant system model The the a an and of is are what where which",
    "How many shapes are there? one two three four five. Picture image photo caption.",
]


def _corpus() -> list[str]:
    lines = []
    for i, shape in enumerate(_SHAPES):
        for j, color in enumerate(_COLORS):
            shape2 = _SHAPES[(i + 3) % len(_SHAPES)]
            color2 = _COLORS[(j + 4) % len(_COLORS)]
            rel = _RELATIONS[(i + j) % len(_RELATIONS)]
            for template in _SENTENCES:
                lines.append(template.format(c=color, s=shape, r=rel, s2=shape2, c2=color2))
    return lines


def build_tokenizer(
    special_tokens: list[str],
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
    extra_attributes: dict[str, str] | None = None,
    vocab_size: int = 512,
    chat_template: str | None = None,
    add_bos: bool = False,
    corpus: list[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer whose special tokens are never split.

    Args:
        special_tokens: every special token string of the family (role markers, image placeholders,
            BOS/EOS/PAD). They are passed to the trainer, so they get ids below the merges.
        bos_token, eos_token, pad_token, unk_token: which of ``special_tokens`` play these roles.
        extra_attributes: named special tokens a processor looks up on the tokenizer, e.g.
            ``{"image_token": "<image>"}`` (passed as ``extra_special_tokens``).
        vocab_size: target size of the BPE vocabulary, special tokens included.
        chat_template: Jinja chat template to attach.
        add_bos: prepend ``bos_token`` to every encoded sequence, as Llama-style tokenizers do.
        corpus: sentences to train the merges on (default: a small set about ShapesWorld scenes).

    Returns:
        A ``PreTrainedTokenizerFast`` that ``save_pretrained``/``from_pretrained`` round-trip.
    """
    roles = [t for t in (bos_token, eos_token, pad_token, unk_token) if t]
    specials = list(dict.fromkeys(roles + list(special_tokens)))
    backend = Tokenizer(models.BPE(unk_token=unk_token))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus or _corpus(), trainer=trainer)
    if add_bos and bos_token:
        from tokenizers import processors

        bos_id = backend.token_to_id(bos_token)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, bos_id)],
        )
    kwargs = {k: v for k, v in dict(bos_token=bos_token, eos_token=eos_token,
                                    pad_token=pad_token, unk_token=unk_token).items() if v}
    if extra_attributes:
        kwargs["extra_special_tokens"] = dict(extra_attributes)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    others = [t for t in specials if t not in roles and t not in (extra_attributes or {}).values()]
    if others:
        tokenizer.add_special_tokens({"additional_special_tokens": others})
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer
