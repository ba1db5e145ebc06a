"""lvlm_probe's operations at the widths of real 7B vision-language models: peak memory above the
weights and time relative to a bare forward, per operation.

Run:  .venv/bin/python benchmarks/real_width.py [--shape llava-1.5-7b qwen2-vl-7b] [--layers 2]
                                                [--repeats 3] [--device cpu] [--full-depth]

The models are the real transformers classes at the real widths (llava-1.5-7b: CLIP ViT-L/14 at
336 px, 576 image tokens, Llama d_model 4096, 32 heads, MLP 11008, vocabulary 32064; Qwen2-VL-7B:
ViT 1280 wide with a 2x2 merger, 576 image tokens from a 672 px image, Qwen2 d_model 3584, 28
heads, 4 KV heads, MLP 18944, vocabulary 152064), built offline from configs with random weights in
bfloat16 and ``--layers`` layers per tower, so that each operation runs in minutes on a CPU.
``--full-depth`` also builds llava-1.5-7b at its full depth (32 + 24 layers, about 14 GB) and runs
one forward and one capture, to check that memory scales with depth as the reduced-depth figures
predict.

Each operation runs in its own process, which loads the model, runs a bare forward of the same
batch ``--repeats`` times, runs the operation once (what a first call loads once, libraries,
kernels, thread pools, is not memory the operation needs per call), resets the kernel's peak-RSS
counter (``/proc/self/clear_refs``), then runs the operation ``--repeats`` times; allocations over
64 KiB are served by mmap in that process (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the
resident set at once and the peak is what was alive at one time. Reported per operation: time /
bare forward (medians, same process), the peak resident memory above the process's resident size
before the operation (on CUDA: ``torch.cuda.max_memory_allocated`` above the allocated bytes), the
same by the formula of ``docs/scaling.md`` section 5 (:func:`predicted`, from the model's sizes)
and their ratio, the bytes of the values the operation returns, and whether any weight changed
dtype.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lvlm_probe as lp

SHAPES = {
    "llava-1.5-7b": dict(
        family="llava", image_px=336, n_layers_full=32, vision_layers_full=24,
        vision=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336,
                    patch_size=14),
        text=dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                  vocab_size=32064, max_position_embeddings=4096)),
    "qwen2-vl-7b": dict(
        family="qwen2_vl", image_px=672, n_layers_full=28, vision_layers_full=32,
        vision=dict(embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2),
        text=dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                  vocab_size=152064, max_position_embeddings=32768)),
}
OPERATIONS = ["forward", "capture", "extract", "source_split", "image_map_ablation", "image_map_ig", "knockout",
              "patch_one_layer", "logit_lens", "transformer_lens_run_with_cache", "nnsight_trace"]
# image_map(method="ablation") hides each of the ~600 cells and words in its own row, MAP_ROWS rows
# per pass: ~600 forward passes' work, about an hour per run on 2 CPU cores; ask for it with --operations
DEFAULT = [op for op in OPERATIONS if op != "image_map_ablation"]
RESID = "blocks.*.hook_resid_post"
EXTRACT_N, EXTRACT_BATCH = 32, 8
MAP_ROWS = 16  # image_map's default batch_size: rows per forward pass
IG_STEPS = 8  # integration steps of image_map(method="ig") here (the default is 256: time scales with it)


# --- building the models --------------------------------------------------------------------------
def build(shape: str, layers: int | None, out: Path) -> Path:
    """Save a random-weight bfloat16 model of ``shape`` with ``layers`` layers per tower (None: the
    real depth) and its processor to ``out``; returns ``out``."""
    spec = SHAPES[shape]
    lm_layers = layers or spec["n_layers_full"]
    vision_layers = layers or spec["vision_layers_full"]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # weights are created in bfloat16: never a float32 copy
    try:
        model, processor = (_llava if spec["family"] == "llava" else _qwen2_vl)(spec, lm_layers, vision_layers)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _llava(spec: dict, lm_layers: int, vision_layers: int):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
        LlavaProcessor,
    )

    from lvlm_probe.zoo.tiny_builders import llava

    _, tiny = llava.build()
    tokenizer = tiny.tokenizer
    px, patch = spec["image_px"], spec["vision"]["patch_size"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(num_hidden_layers=vision_layers, **spec["vision"]),
        text_config=LlamaConfig(num_hidden_layers=lm_layers, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **spec["text"]),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-2, dtype="bfloat16")
    config.architectures = ["LlavaForConditionalGeneration"]
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=tiny.chat_template)
    return LlavaForConditionalGeneration(config).eval(), processor


def _qwen2_vl(spec: dict, lm_layers: int, vision_layers: int):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from lvlm_probe.zoo.tiny_builders import qwen2_vl

    tokenizer = qwen2_vl.build_qwen_tokenizer()
    text = {**qwen2_vl.text_config(tokenizer), **spec["text"], "num_hidden_layers": lm_layers,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
    vision = {**spec["vision"], "depth": vision_layers, "hidden_size": spec["text"]["hidden_size"],
              "in_channels": 3, "temporal_patch_size": 2}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **qwen2_vl.token_ids(tokenizer),
                           dtype="bfloat16")
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    px = spec["image_px"]
    sizes = {"patch_size": spec["vision"]["patch_size"], "temporal_patch_size": 2, "merge_size": 2,
             "min_pixels": px * px, "max_pixels": px * px}
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes),
                                 video_processor=Qwen2VLVideoProcessor(**sizes), tokenizer=tokenizer,
                                 chat_template=qwen2_vl.CHAT_TEMPLATE)
    return Qwen2VLForConditionalGeneration(config).eval(), processor


# --- one operation, in its own process ---------------------------------------------------------------
def _rss() -> tuple[int, int]:
    """(current, peak) resident set size in bytes, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) << 10, int(fields["VmHWM"].split()[0]) << 10


def _reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the bytes in use now."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    return _rss()[0]


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss()[1]


def _bytes(value) -> int:
    """Bytes of the tensors a result holds (a cache, a store's tensors, a result's fields)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(_bytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0


def _operation(name: str, model, batch, corrupted, rows, work: Path):
    """The call that runs operation ``name`` once, returning what the user keeps."""
    target, foil = 100, 200  # token ids: random weights have no meaningful answers

    def capture():
        with model.capture(RESID, positions="image") as cache:
            model.forward(batch)
        return {k: cache[k] for k in cache.names()}

    def extract():
        out = work / f"acts-{time.monotonic_ns()}"
        store = lp.extract(model, rows, hooks=RESID, positions="image", reduce="mean", out=out,
                           batch_size=EXTRACT_BATCH, progress=False)
        return {h: store[h] for h in store.hooks}

    def transformer_lens():
        bridge = lp.interop.transformer_bridge(model)
        names = lp.hooks.expand(RESID, model.hook_names())
        with torch.no_grad():
            _, cache = bridge.run_with_cache(**lp.interop.bridge_inputs(batch), names_filter=names)
        return dict(cache)

    def nnsight():
        nn_model = lp.interop.nnsight(model)
        names = lp.hooks.expand(RESID, model.hook_names())
        with torch.no_grad(), nn_model.trace(**batch.inputs) as tracer:
            saved = lp.interop.nnsight_save(tracer, model, names)
        return {name: saved[name] for name in names}

    attribution = lp.attribution
    calls = {
        "forward": lambda: model.forward(batch),
        "capture": capture,
        "extract": extract,
        "source_split": lambda: attribution.source_split(model, batch, target=target, foil=foil),
        "image_map_ablation": lambda: attribution.image_map(model, batch, target, foil=foil, method="ablation"),
        "image_map_ig": lambda: attribution.image_map(model, batch, target, foil=foil, method="ig", n_steps=IG_STEPS),
        "knockout": lambda: attribution.knockout(model, batch, source="image", dest="last", window=1,
                                                 target=target),
        "patch_one_layer": lambda: lp.circuits.patch(model, batch, corrupted, "blocks.0.hook_resid_pre",
                                                     positions=["image", "prompt", "last"],
                                                     answers=(target, foil)),
        "logit_lens": lambda: attribution.logit_lens(model, batch, positions="image", k=5),
        "transformer_lens_run_with_cache": transformer_lens,
        "nnsight_trace": nnsight,
    }
    return calls[name]


def child(args: argparse.Namespace) -> None:
    model = lp.load(args.model_dir, device=args.device, dtype="bfloat16")
    dtypes = {n: p.dtype for n, p in model.hf.named_parameters()}
    world = lp.worlds.ShapesWorld(seed=0, image_size=args.image_px)
    questions = world.questions(EXTRACT_N, level="attribute")
    batch = model.prepare(images=[questions[0].image], prompts=[questions[0].prompt])
    corrupted = model.prepare(images=[questions[1].image], prompts=[questions[0].prompt])
    rows = [{"id": i, "image": q.image, "prompt": q.prompt} for i, q in enumerate(questions)]
    with tempfile.TemporaryDirectory() as work:
        call = _operation(args.child, model, batch, corrupted, rows, Path(work))
        forward = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model.forward(batch)
            forward.append(time.perf_counter() - start)
        # one call before the counter is reset: what a first call loads once (libraries, kernels,
        # thread pools) is not memory the operation needs per call
        call()
        base = _reset_peak(model.device)
        times, kept = [], 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            value = call()
            times.append(time.perf_counter() - start)
            kept = _bytes(value)
            del value
        peak = _peak(model.device) - base
    upcast = sorted(n for n, p in model.hf.named_parameters() if p.dtype != dtypes[n])
    print(json.dumps({"operation": args.child, "seconds": statistics.median(times),
                      "forward_seconds": statistics.median(forward), "peak_extra_bytes": peak,
                      "kept_bytes": kept, "upcast_parameters": upcast[:5], "dims": _dims(model, batch)}))


def _dims(model, batch) -> dict:
    """The sizes the memory formula reads (see :func:`predicted`)."""
    text = model.hf.config.get_text_config()
    vision = model.hf.config.vision_config
    if model.family.name == "qwen2_vl":  # patches before the 2x2 merger; sdpa per image, no mask
        n_vision = int(batch.inputs["image_grid_thw"].prod(-1).sum())
        d_vision, mlp_vision, masked = vision.embed_dim, vision.embed_dim * vision.mlp_ratio, False
    else:  # CLIP: the patches and the class token, under a mask like the language model's
        n_vision = (vision.image_size // vision.patch_size) ** 2 + 1
        d_vision, mlp_vision, masked = vision.hidden_size, vision.intermediate_size, True
    return {"T": int(batch.input_ids.shape[1]), "T_img": int(batch.layouts[0].positions("image").numel()),
            "d": text.hidden_size, "F": text.intermediate_size, "H": text.num_attention_heads,
            "V": model.d_vocab, "L": model.n_layers, "N_v": n_vision, "d_v": d_vision, "F_v": mlp_vision,
            "H_v": vision.num_attention_heads if hasattr(vision, "num_attention_heads") else vision.num_heads,
            "vision_masked": masked}


def run_child(model_dir: Path, operation: str, image_px: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", operation, "--model-dir", str(model_dir),
               "--image-px", str(image_px), "--repeats", str(args.repeats), "--device", args.device]
    # glibc keeps freed heap memory for reuse, so a process's resident size would not fall after a
    # step and its peak would hide the next one's; served by mmap, every tensor over 64 KiB returns
    # its pages when freed, and the peak counts only what is alive at once
    env = {**os.environ, "TQDM_DISABLE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"operation": operation, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "?"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the memory formula of docs/scaling.md, section 5 ------------------------------------------------
B = 2  # bytes per value in bfloat16


def row_bytes(m: dict) -> float:
    """Peak transient of one row of a pass: the larger of a language-model layer (the MLP's gate,
    up and product, a float32 norm, and the attention scores its mask makes sdpa materialise)
    and a vision layer (the same, scores only where its attention gets a mask)."""
    lm = m["T"] * (3 * m["F"] * B + 4 * m["d"]) + m["H"] * m["T"] ** 2 * B
    vision = m["N_v"] * (3 * m["F_v"] * B + 4 * m["d_v"]) + (m["H_v"] * m["N_v"] ** 2 * B if m["vision_masked"] else 0)
    return max(lm, vision)


def eager_row_bytes(m: dict) -> float:
    """A row whose attention is edited (hidden keys, knocked-out edges): eager attention also keeps
    the masked scores, their float32 softmax and its bfloat16 copy (8 bytes per score)."""
    return row_bytes(m) + 8 * m["H"] * m["T"] ** 2


def graph_bytes_per_layer(m: dict) -> float:
    """What autograd keeps of one language-model layer for one row when only the inputs need a
    gradient (the weights are out of autograd): three MLP tensors of width F (the gate, its
    activation, up), six of width d in bfloat16 (queries, keys, values, attention output, the
    norms' outputs) and one float32 norm input."""
    return m["T"] * (3 * m["F"] * B + 6 * m["d"] * B + 4 * m["d"])


def predicted(operation: str, r: dict) -> float | None:
    """Peak extra bytes of ``operation`` by the formula (None for the peer libraries)."""
    m = r["dims"]
    kept = r["kept_bytes"]
    logits = m["T"] * m["V"] * B + 4 * m["T"] * m["d"]  # every position's logits, the final norm
    forward = max(row_bytes(m), logits)
    return {
        "forward": forward,
        "capture": forward + kept,
        "extract": EXTRACT_BATCH * row_bytes(m) + kept,
        "source_split": 4 * eager_row_bytes(m),
        "knockout": (m["L"] + 1) * eager_row_bytes(m),
        "patch_one_layer": 3 * row_bytes(m) + 2 * m["T"] * m["d"] * B,
        "logit_lens": max(row_bytes(m), 3 * m["T_img"] * m["V"] * 4) + m["L"] * m["T_img"] * m["d"] * B,
        "image_map_ig": min(IG_STEPS, MAP_ROWS) * (m["L"] * graph_bytes_per_layer(m) + row_bytes(m)),
        "image_map_ablation": MAP_ROWS * eager_row_bytes(m),
    }.get(operation)


def report(shape: str, layers: int, results: list[dict]) -> None:
    print(f"\n{shape}, {layers} layers per tower, bfloat16, batch of one image")
    print(f"{'operation':34s} {'time / forward':>15s} {'peak extra MiB':>15s} {'formula MiB':>12s} "
          f"{'kept MiB':>9s}  notes")
    for r in results:
        if "error" in r:
            print(f"{r['operation']:34s} {'-':>15s} {'-':>15s} {'-':>9s}  {r['error']}")
            continue
        ratio = r["seconds"] / r["forward_seconds"]
        note = f"upcast {r['upcast_parameters']}" if r["upcast_parameters"] else ""
        formula = predicted(r["operation"], r)
        shown = f"{formula / 2**20:12.0f}" if formula else f"{'-':>12s}"
        if formula:
            note += f"measured / formula {r['peak_extra_bytes'] / formula:.2f}"
        print(f"{r['operation']:34s} {ratio:15.2f} {r['peak_extra_bytes'] / 2**20:15.0f} {shown} "
              f"{r['kept_bytes'] / 2**20:9.1f}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--operations", nargs="+", default=DEFAULT, choices=OPERATIONS)
    parser.add_argument("--full-depth", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--image-px", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    everything = {}
    with tempfile.TemporaryDirectory() as root:
        for shape in args.shape:
            model_dir = build(shape, args.layers, Path(root) / shape)
            results = [run_child(model_dir, op, SHAPES[shape]["image_px"], args) for op in args.operations]
            report(shape, args.layers, results)
            everything[f"{shape}/{args.layers}"] = results
        if args.full_depth:
            model_dir = build("llava-1.5-7b", None, Path(root) / "full")
            results = [run_child(model_dir, op, SHAPES["llava-1.5-7b"]["image_px"], args)
                       for op in ("forward", "capture")]
            report("llava-1.5-7b", SHAPES["llava-1.5-7b"]["n_layers_full"], results)
            everything["llava-1.5-7b/full"] = results
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
