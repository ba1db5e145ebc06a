"""TokenLayout and prompt location, on a real tokenizer without a model."""
from __future__ import annotations

import pytest
import torch

from lvlm_probe.errors import LayoutError
from lvlm_probe.layout import ImageLayout, TokenLayout, grid_from_run, locate_prompt
from lvlm_probe.zoo.tiny_builders.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["<image>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                           unk_token="<unk>", extra_attributes={"image_token": "<image>"}, add_bos=True)


@pytest.mark.parametrize("prompt", [
    "Is there a red heart? Answer yes or no.",
    "  leading and trailing spaces  ",
    "Ünïcödé shapes: ★ and ♥?",
    "USER: a prompt that looks like the template",
])
def test_locate_prompt_tokens_spell_the_prompt(tokenizer, prompt):
    text = f"USER: <image><image>\n{prompt} ASSISTANT:"
    ids = tokenizer(text)["input_ids"]
    start = max(i for i, t in enumerate(ids) if t == tokenizer.image_token_id) + 1
    positions, spans = locate_prompt(tokenizer, ids, start, prompt)
    assert positions == list(range(positions[0], positions[-1] + 1))  # contiguous
    assert tokenizer.decode([ids[p] for p in positions]).strip() == prompt.strip()
    # spans cover the stripped prompt, in order, without gaps
    assert spans[0][0] == prompt.find(prompt.strip()) or spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] >= len(prompt.rstrip())


def test_locate_prompt_reports_missing_text(tokenizer):
    ids = tokenizer("USER: <image>\nsomething else ASSISTANT:")["input_ids"]
    with pytest.raises(LayoutError, match="could not find the prompt 'a red heart'"):
        locate_prompt(tokenizer, ids, 0, "a red heart")


def _layout(prompt="Is the red heart left of the star?") -> TokenLayout:
    # 2 template, 4 image (2x2), 9 prompt tokens with made-up spans, 1 template
    words = prompt.split(" ")
    spans, at = [], 0
    for w in words:
        spans.append((at, at + len(w)))
        at += len(w) + 1
    n = len(words)
    groups = {
        "image": torch.arange(2, 6), "prompt": torch.arange(6, 6 + n),
        "template": torch.tensor([0, 1, 6 + n]), "pad": torch.empty(0, dtype=torch.long),
    }
    image = ImageLayout(index=0, grids=(grid_from_run(torch.arange(2, 6), 2, 2),))
    return TokenLayout(length=7 + n, groups=groups, images=(image,), image_mode="tokens",
                       tokens=tuple("t" * (7 + n)), prompt=prompt,
                       prompt_spans=torch.tensor(spans))


def test_positions_and_masks():
    lay = _layout()
    assert lay.positions("all").tolist() == list(range(lay.length))
    assert lay.mask("image").sum() == 4
    assert lay.image_grids == [(2, 2)]
    assert lay.images[0].grid.positions.tolist() == [[2, 3], [4, 5]]


def test_word_positions_match_whole_words_case_insensitive():
    lay = _layout()
    assert lay.word_positions("heart").tolist() == [9]
    assert lay.word_positions("RED").tolist() == [8]
    assert lay.word_positions("the").tolist() == [7, 12]  # both "the", whole words only
    with pytest.raises(LayoutError, match="'he' does not occur"):
        lay.word_positions("he")


def test_grid_from_run_checks_the_count():
    with pytest.raises(LayoutError, match="needs 6 positions, got 5"):
        grid_from_run(torch.arange(5), 2, 3)
