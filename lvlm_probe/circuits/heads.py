"""Head attribution: which heads move image information to the answer position.

For each head, over a dataset, two measurements at the last position (where the answer is read):

* ``image_attention``: the attention mass the last token puts on image tokens;
* ``direct_effect``: the head's direct logit attribution to the answer (its write through the
  frozen final norm onto the answer's unembedding, :func:`lvlm_probe.attribution.dla`), and
  ``image_effect``, the part of it read from image tokens.

``score = image_attention * direct_effect`` ranks heads that both look at the image and push the
answer; ``image_effect`` is the exact version of the same idea (it is the head's write restricted to
image keys), and ranking by it is one ``sort_values`` away.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from einops import rearrange

from ..attribution.direct_logit import dla
from ..attribution.groups import group_mask
from ..attribution.results import legacy_calls, moved_to_keywords
from ..attribution.targets import Answer
from ..errors import InputError
from ..inputs import Batch

COLUMNS = ["rank", "layer", "head", "score", "image_attention", "direct_effect", "image_effect", "n"]


@legacy_calls(moved_to_keywords(3, ["foil"], renamed={"data": "batch"}),
              "head_attribution(model, batch, target, foil=..., batch_size=...)")
def head_attribution(
    model, batch: Batch | Sequence[Any], target: Answer | list[Answer] | None = None, *,
    foil: Answer | list[Answer] | None = None, batch_size: int = 16,
) -> pd.DataFrame:
    """Rank heads by how much image information they move to the answer, over a dataset.

    Args:
        model: an :class:`~lvlm_probe.LVLM` (a family :func:`~lvlm_probe.attribution.dla` supports).
        batch: a batch from ``model.prepare``, or a sequence of examples with ``image``, ``prompt``
            and ``answer`` (ShapesWorld questions, or mappings with those keys), split into
            batches of ``batch_size``.
        target: the answer scored per example; default each example's ``answer`` (for a batch:
            required).
        foil: an alternative answer for a logit difference, or None for the target's logit.
        batch_size: examples per forward pass when ``batch`` is a sequence of examples.

    Returns:
        A DataFrame with one row per head, best first: ``rank`` (1 = best), ``layer``, ``head``,
        ``score`` (``image_attention * direct_effect``), ``image_attention`` (mean attention mass
        from the last token to image tokens), ``direct_effect`` (mean direct logit attribution),
        ``image_effect`` (its part read from image tokens) and ``n`` (examples).

    Raises:
        InputError: for empty data, examples without an image or an answer, a bad batch size, or
            a family dla does not support.

    Example:
        >>> qs = lp.worlds.ShapesWorld(seed=0).questions(64, level="attribute", kind="color")
        >>> lp.circuits.head_attribution(model, qs).head(5)
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for chunk, targets, foils in _batches(model, batch, target, foil, batch_size):
        terms = dla(model, chunk, targets, foil=foils).terms
        heads = terms[terms["component"] == "head"]
        effect = heads.pivot_table(index=["layer", "head"], columns="source", values="value", aggfunc="sum")
        # pivot_table sorts its (layer, head) index, so rows are layer-major
        total = rearrange(torch.tensor(effect.sum(axis=1).to_numpy()), "(l h) -> l h", h=model.n_heads)
        image = rearrange(torch.tensor(effect.get("image", 0.0 * effect.iloc[:, 0]).to_numpy()),
                          "(l h) -> l h", h=model.n_heads)
        attention = image_attention(model, chunk)  # [layer, head], summed over examples
        for key, value in (("direct", total), ("image", image), ("attention", attention)):
            sums[key] = sums.get(key, 0) + value
        n += len(chunk)
    layers, heads = torch.meshgrid(torch.arange(model.n_layers), torch.arange(model.n_heads), indexing="ij")
    table = pd.DataFrame({
        "layer": layers.flatten().numpy(), "head": heads.flatten().numpy(),
        "image_attention": (sums["attention"] / n).flatten().numpy(),
        "direct_effect": (sums["direct"] / n).flatten().numpy(),
        "image_effect": (sums["image"] / n).flatten().numpy(), "n": n,
    })
    table["score"] = table["image_attention"] * table["direct_effect"]
    table = table.sort_values("score", ascending=False, ignore_index=True)
    table["rank"] = range(1, len(table) + 1)
    return table[COLUMNS]


def image_attention(model, batch) -> torch.Tensor:
    """``[layer, head]``: attention mass from each example's last token to its image tokens,
    summed over the batch's examples."""
    image = group_mask(batch, "image").float()  # [b, seq]
    with torch.no_grad(), model.capture("blocks.*.attn.hook_pattern", positions="last", reduce="last") as cache:
        model.forward(batch, last_position=True)  # values come from the hooks
    patterns = cache.stack("blocks.*.attn.hook_pattern").float().cpu()  # [layer, b, head, key]
    return torch.einsum("lbhk,bk->lh", patterns, image)


def _batches(model, data, target, foil, batch_size: int) -> Iterator[tuple[Batch, Any, Any]]:
    """Batches with their targets and foils (lists of one per example are split with the data)."""
    if isinstance(data, Batch):
        if target is None:
            raise InputError("with a prepared batch, pass target= (one answer or one per example); "
                             "with a sequence of examples their 'answer' is used")
        yield data, target, foil
        return
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence) or not data:
        raise InputError(f"batch must be a Batch or a non-empty sequence of examples with image, prompt and "
                         f"answer, got {type(data).__name__}")
    for start in range(0, len(data), batch_size):
        chunk = data[start:start + batch_size]
        fields = [_fields(ex, start + i, need_answer=target is None) for i, ex in enumerate(chunk)]
        batch = model.prepare(images=[f[0] for f in fields], prompts=[f[1] for f in fields])
        if target is None:
            targets: Any = [f[2] for f in fields]
        else:
            targets = _part(target, start, batch_size)
        yield batch, targets, None if foil is None else _part(foil, start, batch_size)


def _part(answers: Any, start: int, size: int) -> Any:
    """One answer for every example, or the chunk's part of a list of one per example."""
    return answers if isinstance(answers, (str, int)) else list(answers)[start:start + size]


def _fields(example: Any, i: int, need_answer: bool) -> tuple[Any, str, Any]:
    get = example.get if isinstance(example, Mapping) else lambda key: getattr(example, key, None)
    image, prompt, answer = get("image"), get("prompt"), get("answer")
    if image is None or not isinstance(prompt, str) or (need_answer and answer is None):
        raise InputError(f"example {i} needs an image, a prompt string and (without target=) an answer; got "
                         f"image={type(image).__name__}, prompt={prompt!r}, answer={answer!r}")
    return image, prompt, answer
