"""Clean/corrupted pairs of batches, the answers they are scored on, and patching metrics.

A patching metric scores the last position's logits of every example: by default the logit
difference between the clean answer and the corrupted answer. It is normalised against the clean
and corrupted runs, ``(m - m_corrupted) / (m_clean - m_corrupted)``, so 1 means the clean answer
is fully restored and 0 means nothing changed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..attribution.targets import Answer, target_ids
from ..errors import InputError

METRICS = ("logit_diff", "logprob", "prob")
Metric = str | Callable[[Tensor], Tensor]


def check_pair(clean, corrupted) -> None:
    """Check that two batches can be patched into each other position by position.

    Both must hold the same number of examples with equal token layouts (same prompt, same
    position of every group; the images may differ), and equal tokens outside the image.

    Raises:
        InputError: naming the first example and group that differ.
    """
    if len(clean) != len(corrupted):
        raise InputError(f"clean has {len(clean)} examples but corrupted has {len(corrupted)}; "
                         "expected one corrupted example per clean one")
    if clean.input_ids.shape != corrupted.input_ids.shape:
        raise InputError(f"clean and corrupted inputs have shapes {tuple(clean.input_ids.shape)} and "
                         f"{tuple(corrupted.input_ids.shape)}; expected equal token layouts (same prompts, "
                         "images of the same size)")
    for i, (a, b) in enumerate(zip(clean.layouts, corrupted.layouts)):
        for group in ("image", "prompt", "template", "pad"):
            if not torch.equal(a.positions(group), b.positions(group)):
                raise InputError(
                    f"example {i}: the {group} tokens sit at different positions in clean "
                    f"({a.summary()}) and corrupted ({b.summary()}); patching needs equal token layouts: "
                    f"the same prompt ({a.prompt!r} vs {b.prompt!r}) and images of the same size")
        text = a.mask("image").logical_not()
        if not torch.equal(clean.input_ids[i].cpu()[text], corrupted.input_ids[i].cpu()[text]):
            raise InputError(f"example {i}: clean and corrupted have different text tokens "
                             f"({a.prompt!r} vs {b.prompt!r}); patching needs the same prompt")


@dataclass(frozen=True)
class Scorer:
    """Scores last-position logits ``[batch, vocab] -> [batch]`` for one pair of batches.

    Attributes:
        ids: ``[batch, 2]`` token ids of the clean and corrupted answers.
        answers: their decoded strings, ``[(clean, corrupted)]`` per example.
        name: the metric's name.
    """

    ids: Int[Tensor, "batch 2"]
    answers: list[tuple[str, str]]
    name: str
    fn: Callable[[Tensor], Tensor] | None = None

    def __call__(self, logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
        logits = logits.float().cpu()
        if self.fn is not None:
            out = torch.as_tensor(self.fn(logits)).float().reshape(-1)
            if out.numel() != logits.shape[0]:
                raise InputError(f"the metric returned {out.numel()} values for {logits.shape[0]} examples; "
                                 "expected one per example")
            return out
        rows = torch.arange(logits.shape[0])
        if self.name == "logit_diff":
            return logits[rows, self.ids[:, 0]] - logits[rows, self.ids[:, 1]]
        logprobs = torch.log_softmax(logits, dim=-1)[rows, self.ids[:, 0]]
        return logprobs if self.name == "logprob" else logprobs.exp()


def scorer(model, clean, corrupted, metric: Metric, answers, clean_logits: Tensor, corrupted_logits: Tensor
           ) -> Scorer:
    """A :class:`Scorer` for a pair of batches.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        clean, corrupted: the batches (equal layouts).
        metric: ``"logit_diff"`` (clean answer minus corrupted answer), ``"logprob"`` or ``"prob"``
            (of the clean answer), or a function ``logits [batch, vocab] -> [batch]``.
        answers: ``(clean answers, corrupted answers)``, each one answer or one per example
            (strings of one token, or token ids); None takes each run's top token.
        clean_logits, corrupted_logits: ``[batch, vocab]`` last-position logits of the two runs.

    Raises:
        InputError: for an unknown metric, malformed answers, or an example whose clean and
            corrupted answers are the same token.
    """
    if not callable(metric) and metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; expected one of {METRICS} or a function "
                         "logits [batch, vocab] -> [batch]")
    if answers is None:
        ids = torch.stack([clean_logits.argmax(-1), corrupted_logits.argmax(-1)], 1).cpu()
        same = (ids[:, 0] == ids[:, 1]).nonzero().flatten().tolist()
        if same and not callable(metric):
            raise InputError(f"examples {same} predict the same top token on clean and corrupted inputs, "
                             "so their answers cannot be told apart; pass answers=(clean, corrupted)")
    else:
        if not isinstance(answers, (tuple, list)) or len(answers) != 2:
            raise InputError(f"answers must be a pair (clean answers, corrupted answers), got {answers!r}")
        clean_answers: Answer | list[Answer] = answers[0]
        _, _, ids = target_ids(model, clean, clean_answers, answers[1])
    decoded = [(model.tokenizer.decode([int(a)]), model.tokenizer.decode([int(b)])) for a, b in ids.tolist()]
    if callable(metric):
        return Scorer(ids, decoded, getattr(metric, "__name__", "custom"), metric)
    return Scorer(ids, decoded, metric)


def normalise(value: Tensor, clean: Tensor, corrupted: Tensor) -> Tensor:
    """``(value - corrupted) / (clean - corrupted)``: 1 at the clean run, 0 at the corrupted run.

    Raises:
        InputError: when the clean and corrupted metrics are equal (nothing to restore).
    """
    gap = clean - corrupted
    if bool((gap.abs() < 1e-6).any()):
        raise InputError(f"the clean and corrupted runs give the same metric ({clean.tolist()} vs "
                         f"{corrupted.tolist()}), so there is nothing to restore; choose inputs or "
                         "answers that differ")
    return (value - corrupted) / gap
