"""Image maps: lvlm_probe's ``image_map`` against plain captum on the same model, inputs and target.

Run:  .venv/bin/python benchmarks/attribution.py [--examples 8] [--device cuda]

Both compute FeatureAblation over the same features (the image's grid cells and the prompt's
words) of shapes-llava's log-probability of the right colour. Plain captum is written the way a
user would write it without this toolkit: a forward function that removes features by zeroing
their tokens in the HF ``attention_mask`` and runs the model, one perturbation at a time
(captum's default) and, second, all perturbations of an example in one batch. The script prints,
from one run, the largest difference between the maps and the time ratios.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from captum.attr import FeatureAblation

import lvlm_probe as lp
from lvlm_probe.attribution import image_map
from lvlm_probe.attribution.image_maps import features


def plain_captum(model, batch, answers, per_eval: int) -> list[np.ndarray]:
    """FeatureAblation with the HF attention mask as the removal, per example."""
    maps = []
    for i, layout in enumerate(batch.layouts):
        feats = features(layout)
        target = int(model.answer_token_ids(batch, [[answers[i]]] * len(batch))[i, 0])
        inputs = {k: v[i:i + 1] for k, v in batch.inputs.items()}
        member = torch.zeros(len(feats.positions), inputs["input_ids"].shape[1])
        for f, pos in enumerate(feats.positions):
            member[f, pos] = 1.0

        def forward(gates, inputs=inputs, member=member, target=target):
            m = len(gates)
            mask = inputs["attention_mask"].repeat(m, 1) * (((1 - gates) @ member) < 0.5).long()
            run = {k: v.repeat(m, *[1] * (v.ndim - 1)) for k, v in inputs.items()} | {"attention_mask": mask}
            with torch.no_grad():
                logits = model.hf(**run).logits[:, -1].float()
            return torch.log_softmax(logits, -1)[:, target]

        ones = torch.ones(1, len(feats.positions))
        values = FeatureAblation(forward).attribute(ones, baselines=0.0, feature_mask=torch.arange(len(ones[0]))[None],
                                                    perturbations_per_eval=per_eval)
        rows, cols = feats.grids[0]
        maps.append(values[0, : feats.n_image].reshape(rows, cols).numpy())
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    model = lp.zoo.load("shapes-llava", device=args.device)
    questions = lp.worlds.ShapesWorld(seed=1000, image_size=64).questions(args.examples, level="attribute",
                                                                         kind="color")
    batch = model.prepare(images=[q.image for q in questions], prompts=[q.prompt for q in questions])
    answers = [q.answer for q in questions]
    image_map(model, batch, answers[:1] * len(batch), method="ablation")  # warm-up

    start = time.perf_counter()
    ours = image_map(model, batch, answers, method="ablation")
    t_ours = time.perf_counter() - start
    timings, diffs = {}, {}
    for per_eval, name in ((1, "plain captum, one perturbation per pass"), (64, "plain captum, batched")):
        start = time.perf_counter()
        theirs = plain_captum(model, batch, answers, per_eval)
        timings[name] = time.perf_counter() - start
        diffs[name] = max(float(np.abs(ours.grids[i][0] - theirs[i]).max()) for i in range(len(batch)))
    print(f"shapes-llava on {model.device}, {len(batch)} colour questions, FeatureAblation over "
          f"{ours.scores.shape[1]}x{ours.scores.shape[2]} cells + prompt words\n")
    for name in timings:
        print(f"{name:<42} time {name.split(',')[0]} / lvlm_probe = {timings[name] / t_ours:5.2f}   "
              f"max |difference| = {diffs[name]:.2e}")


if __name__ == "__main__":
    main()
