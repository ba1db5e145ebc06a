"""Explaining generations: what capture during ``generate`` costs, and the per-token split's passes.

Run:  .venv/bin/python benchmarks/generation.py [--captions 16] [--tokens 24] [--runs 5] [--device cuda]

On shapes-llava captioning ShapesWorld scenes, from runs interleaved in one process (median of
``--runs`` with the range):

1. ``model.generate(batch, n, capture=...)`` (the residual stream of every layer at every step,
   ``positions="last"`` and ``"all"``) against the same generation without capture
   (``model.generation``, which returns the same texts, ids and log-probabilities);
2. ``lp.attribution.explain_generation`` (all coalitions of all tokens in whole-coalition passes)
   against the same split computed the way a per-token loop would: one teacher-forced pass per
   token, its eight coalitions batched, the earlier words hidden by a key mask. The script checks
   that both give the same values and prints the passes each took.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import lvlm_probe as lp
from lvlm_probe.attribution import explain_generation, teacher_forced
from lvlm_probe.attribution.generation import COALITIONS
from lvlm_probe.attribution.groups import group_mask
from lvlm_probe.attribution.sources import removed_inputs
from lvlm_probe.hooks import attention
from lvlm_probe.worlds.evaluation import CAPTION_PROMPT

RESID = "blocks.*.hook_resid_post"


def per_token_loop(model, batch, ids: list[list[int]]) -> tuple[torch.Tensor, int]:
    """``v(S)`` of every coalition for every token, one pass per token (equal-length continuations)."""
    n = len(ids[0])
    values = torch.empty(len(COALITIONS), len(batch), n)
    image, prompt = group_mask(batch, "image"), group_mask(batch, "prompt")
    start = batch.input_ids.shape[1]
    for t in range(n):
        forced = teacher_forced(model, batch, [row[:t] for row in ids])
        pad = torch.zeros(len(batch), t, dtype=torch.bool)
        earlier = torch.zeros(len(batch), start + t, dtype=torch.bool)
        earlier[:, start:start + max(t - 1, 0)] = True  # the reader (token t - 1) always sees itself
        masks = [(torch.cat([image, pad], 1) & (not c[0])) | (torch.cat([prompt, pad], 1) & (not c[1]))
                 | (earlier & (not c[2])) for c in COALITIONS]
        inputs, _ = removed_inputs(model, forced, forced.inputs, [c[0] for c in COALITIONS],
                                   [c[1] for c in COALITIONS], "mask")
        with torch.no_grad(), attention.hiding_positions(model, torch.cat(masks).to(model.device)):
            logits = model.run(inputs, last_position=True).logits[:, -1].float()
        logprobs = torch.log_softmax(logits, -1).cpu().reshape(len(COALITIONS), len(batch), -1)
        values[:, :, t] = logprobs[:, torch.arange(len(batch)), torch.tensor([row[t] for row in ids])]
    return values, n


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):5.2f} (range {min(ratios):.2f}-{max(ratios):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    model = lp.zoo.load("shapes-llava", device=args.device)
    scenes = lp.worlds.ShapesWorld(seed=2024, image_size=64).scenes(args.captions)
    batch = model.prepare(images=[s.render() for s in scenes], prompts=[CAPTION_PROMPT] * len(scenes))

    # 1. capture during generation, interleaved with plain generation
    plain, last, every = [], [], []
    model.generation(batch, args.tokens)  # warm-up
    for _ in range(args.runs):
        # the same generation and outputs (texts, ids, log-probabilities), without the activations
        plain += timed(lambda: model.generation(batch, args.tokens, min_new_tokens=args.tokens), 1)
        last += timed(lambda: model.generate(batch, args.tokens, capture=RESID, min_new_tokens=args.tokens), 1)
        every += timed(lambda: model.generate(batch, args.tokens, capture=RESID, positions="all",
                                              min_new_tokens=args.tokens), 1)
    print(f"shapes-llava on {model.device}: {len(batch)} captions x {args.tokens} tokens, {RESID} "
          f"({model.n_layers} layers), median of {args.runs} runs\n")
    print(f"generate with capture, positions='last' / without   {spread([a / b for a, b in zip(last, plain)])}")
    print(f"generate with capture, positions='all'  / without   {spread([a / b for a, b in zip(every, plain)])}")

    # 2. the split: whole-coalition passes against a per-token loop, on the same continuations
    out = model.generation(batch, args.tokens, min_new_tokens=args.tokens)
    ids = [row[:args.tokens] for row in out.token_ids]
    ours_t, loop_t = [], []
    for _ in range(args.runs):
        start = time.perf_counter()
        ours = explain_generation(model, batch, continuation=ids, batch_size=8 * len(batch))
        ours_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        values, loop_passes = per_token_loop(model, batch, ids)
        loop_t.append(time.perf_counter() - start)
    diff = float((ours.values - values).abs().max())
    print(f"\nexplain_generation: {ours.passes} pass(es) of {8 * len(batch)} rows; per-token loop: "
          f"{loop_passes} passes; max |difference| of v(S) {diff:.1e}")
    print(f"time per-token loop / explain_generation            {spread([b / a for a, b in zip(ours_t, loop_t)])}")
    for size in (16, 64):
        split = explain_generation(model, batch, continuation=ids, batch_size=size)
        print(f"batch_size={size}: {split.passes} passes (bound ceil(16 B / batch_size) = {-(-16 * len(batch) // size)})")


if __name__ == "__main__":
    main()
