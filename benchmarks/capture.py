"""Capture cost against a bare forward, TransformerLens and nnsight; extraction memory vs dataset size.

Run:  .venv/bin/python benchmarks/capture.py [--device cuda] [--batch 16] [--repeats 30]

Everything is measured in this one run on the same model (the shipped shapes-llava) and batch,
and reported as ratios, since absolute times on a shared machine are noise:

* capture / bare forward: every LM layer's ``hook_resid_post`` at the image positions
  (target: at most 1.10);
* TransformerLens ``run_with_cache`` (names filter: the same names) / capture (target: at least
  1.3);
* an nnsight trace saving the same tensors / capture;
* peak memory of ``lp.extract`` at 10x the examples / at 1x (target: within 10%). Each extraction
  runs in a fresh process, and the peak resident set size is read from the OS, since torch's
  allocations are invisible to Python's tracemalloc.

Timings interleave the methods round by round and take each one's median, so a slow moment of the
machine hits all of them alike.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lvlm_probe as lp
from lvlm_probe import interop

NAMES = "blocks.*.hook_resid_post"


def batch_of(model, n: int):
    questions = lp.worlds.ShapesWorld(seed=0, image_size=64).questions(n, level="attribute")
    return model.prepare(images=[q.image for q in questions], prompts=[q.prompt for q in questions])


def timings(model, batch, repeats: int) -> dict[str, float]:
    names = lp.hooks.expand(NAMES, model.hook_names())
    bridge = interop.transformer_bridge(model)
    nn_model = interop.nnsight(model)
    bridge_inputs = interop.bridge_inputs(batch)

    def bare():
        model.forward(batch)

    def capture():
        with model.capture(names, positions="image") as cache:
            model.forward(batch)
        return cache

    def transformer_lens():
        with torch.no_grad():
            bridge.run_with_cache(**bridge_inputs, names_filter=names)

    def nnsight():
        with torch.no_grad(), nn_model.trace(**batch.inputs) as tracer:
            interop.nnsight_save(tracer, model, names)

    methods = {"bare forward": bare, "capture": capture, "TransformerLens run_with_cache": transformer_lens,
               "nnsight trace": nnsight}
    for run in methods.values():  # warm-up: first-call costs (allocations, nnsight's setup)
        run()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, run in methods.items():
            start = time.perf_counter()
            run()
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def extract_child(n: int, out: str, device: str) -> None:
    """Runs in its own process: extract n questions; print the resident set size before the
    extraction and its peak during it."""
    model = lp.zoo.load("shapes-llava", device=device)
    world = lp.worlds.ShapesWorld(seed=0, image_size=64)
    questions = world.questions(n, level="attribute")  # scene graphs only; images render per batch
    before = reset_peak_rss()  # loading the model peaks higher than extraction: start afresh
    lp.extract(model, questions, hooks=NAMES, positions="image", reduce="mean", out=out,
               batch_size=16, shard_size=256, progress=False)
    print(json.dumps({"n": n, "before": before, "peak": peak_rss()}))


def reset_peak_rss() -> int:
    """Reset the peak RSS to the current RSS (Linux: /proc/self/clear_refs) and return it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS")
    except OSError:  # not Linux: the lifetime peak, which then includes loading the model
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process in bytes since the last reset."""
    try:
        return _status("VmHWM")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def extraction_memory(n: int, device: str) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in (n, 10 * n):
            out = subprocess.run(
                [sys.executable, __file__, "--extract-child", str(count), "--out", f"{tmp}/store-{count}",
                 "--device", device],
                check=True, capture_output=True, text=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="default: CUDA when available")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--examples", type=int, default=256, help="the 1x dataset size for extract")
    parser.add_argument("--extract-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = str(lp.model.resolve_device(args.device))
    if args.extract_child is not None:
        extract_child(args.extract_child, args.out, device)
        return

    model = lp.zoo.load("shapes-llava", device=device)
    batch = batch_of(model, args.batch)
    n_image = int(batch.layouts[0].positions("image").numel())
    print(f"shapes-llava on {device}, {torch.get_num_threads()} threads; batch {args.batch} x "
          f"{batch.input_ids.shape[1]} tokens ({n_image} image tokens each); names {NAMES!r} "
          f"({model.n_layers} layers); median of {args.repeats} interleaved rounds\n")
    t = timings(model, batch, args.repeats)
    ratios = [
        ("capture / bare forward", t["capture"] / t["bare forward"], "<= 1.10", t["capture"] / t["bare forward"] <= 1.10),
        ("TransformerLens run_with_cache / capture", t["TransformerLens run_with_cache"] / t["capture"], ">= 1.30",
         t["TransformerLens run_with_cache"] / t["capture"] >= 1.30),
        ("nnsight trace / capture", t["nnsight trace"] / t["capture"], "", None),
    ]
    memory = extraction_memory(args.examples, device)
    (small, large) = memory
    ratio = large["peak"] / small["peak"]
    growth = (large["peak"] - large["before"]) / max(small["peak"] - small["before"], 1)
    ratios.append((f"extract peak RSS, {large['n']} / {small['n']} examples", ratio, "<= 1.10", ratio <= 1.10))
    width = max(len(r[0]) for r in ratios)
    for name, value, target, ok in ratios:
        verdict = "" if ok is None else ("met" if ok else "NOT MET")
        print(f"{name:<{width}}  {value:6.3f}  {target:>8}  {verdict}")
    print(f"\nextract peak RSS: {small['peak'] / 2**20:.0f} MiB at {small['n']} examples, "
          f"{large['peak'] / 2**20:.0f} MiB at {large['n']}; above the RSS before extracting: "
          f"{(small['peak'] - small['before']) / 2**20:.1f} MiB and "
          f"{(large['peak'] - large['before']) / 2**20:.1f} MiB (ratio {growth:.2f})")


if __name__ == "__main__":
    main()
