"""What shapes-llava's captions hallucinate, and why: ``lp.bench.explain_captions`` on several worlds.

Run:  .venv/bin/python benchmarks/captions.py [--scenes 300] [--seeds 1000 2000 3000] [--device cuda]

For each world seed, the reference model captions ``--scenes`` scenes greedily and every object
mention is explained. Printed per seed, then as the median over seeds with the range:

* mentions, hallucinated mentions (CHAIR_i);
* the image's share of the credit of hallucinated against correctly named shapes, and the image's
  credit itself (log-probability);
* the causes of the hallucinated mentions;
* co-occurrence: hallucinated mentions of a shape whose co-occurring partner the caption named
  before, the earlier words' credit they take against that of correct mentions, and how often the
  earlier word named as strongest is the partner.
"""
from __future__ import annotations

import argparse
import statistics

import pandas as pd

import lvlm_probe as lp


def measure(model, seed: int, n: int) -> dict[str, float]:
    world = lp.worlds.ShapesWorld(seed=seed, image_size=64)
    result = lp.bench.explain_captions(model, world.scenes(n), maps=None, progress=False)
    m = result.mentions
    partner = {a: b for a, b in world.cooccurring} | {b: a for a, b in world.cooccurring}
    earlier = [partner.get(row.object) in set(m[(m.caption == row.caption) & (m.mention < row.mention)].object)
               for row in m.itertuples()]
    m = m.assign(after_partner=earlier, partner=m["object"].map(partner))
    wrong, right = m[m.hallucinated], m[~m.hallucinated]
    pairs = wrong[wrong.after_partner]
    return {"mentions": len(m), "hallucinated": len(wrong), "chair_i": len(wrong) / max(len(m), 1),
            "image_share_hallucinated": wrong.image_share.mean(), "image_share_correct": right.image_share.mean(),
            "image_hallucinated": wrong.image.mean(), "image_correct": right.image.mean(),
            **{f"cause_{c}": int((wrong.cause == c).sum()) for c in lp.bench.CAPTION_CAUSES},
            "partner_hallucinated": len(pairs), "generated_partner_hallucinated": pairs.generated.mean(),
            "generated_correct": right.generated.mean(),
            "strongest_is_partner": (pairs.strongest_word == pairs.partner).mean() if len(pairs) else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000, 2000, 3000])
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    model = lp.zoo.load("shapes-llava", device=args.device)
    table = pd.DataFrame([measure(model, seed, args.scenes) for seed in args.seeds], index=args.seeds)
    pd.set_option("display.width", 200)
    print(f"shapes-llava, {args.scenes} captions per world seed\n")
    print(table.T.round(3).to_string())
    print("\nmedian (range) over seeds")
    for column in table:
        values = table[column].dropna()
        if len(values):
            print(f"  {column:<32} {statistics.median(values):8.3f}  ({values.min():.3f} - {values.max():.3f})")


if __name__ == "__main__":
    main()
