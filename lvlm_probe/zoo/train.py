"""Training of the reference models on ShapesWorld.

Two stages on the real ``LlavaForConditionalGeneration``: stage 1 pre-trains the vision tower on
per-patch labels and aligns the projector (:mod:`lvlm_probe.zoo.vision_pretrain`); stage 2 trains the
projector and language model, tower frozen, on the world's questions and captions, with the loss on
the answer tokens plus that of auxiliary heads at the answer position
(:mod:`lvlm_probe.zoo.answer_heads`). Each step draws the next examples of the world's endless
training stream (so the data never repeats and never sits in memory) and runs them through the
real processor. Every ``checkpoint_every`` steps the weights and optimiser state are written
atomically, so a run that is killed resumes where it stopped and ends with the same weights.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import InputError
from ..worlds.evaluation import CAPTION_PROMPT
from .answer_heads import AnswerHeads, answer_targets
from .shapes_llava import COMMAND, Recipe, build_untrained
from .vision_pretrain import (
    PatchHeads,
    alignment_loss,
    patch_targets,
    position_basis,
    vision_loss,
    word_table,
)

STATE = "train_state"  # subfolder of the output holding the resumable state
VISION_STREAM = 10**8  # stage 1 reads the training stream from here on, apart from stage 2's examples


def collate(processor, examples: list[tuple[Any, str, str]], device: torch.device) -> dict[str, torch.Tensor]:
    """(image, prompt, answer) triples -> model inputs with labels on the answer tokens only.

    The answer follows the chat template's generation prompt as `` <answer></s>``, the way the
    model will be asked at inference (``LVLM.answer_logprobs`` tokenizes answers the same way).
    """
    tokenizer = processor.tokenizer
    prompts = [_template(processor, p) for _, p, _ in examples]
    texts = [t + " " + a + tokenizer.eos_token for t, (_, _, a) in zip(prompts, examples)]
    tokenizer.padding_side = "right"
    full = processor(images=[img for img, _, _ in examples], text=texts, return_tensors="pt", padding=True)
    # Prompt lengths from the tokenizer alone (one <image> each, expanded by the processor).
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    n_image = (full["input_ids"] == image_id).sum(1)
    labels = full["input_ids"].clone()
    labels[full["attention_mask"] == 0] = -100
    for i, ids in enumerate(tokenizer(prompts)["input_ids"]):
        n = len(ids) - 1 + int(n_image[i])
        if full["input_ids"][i, n - 1] != ids[-1]:  # the answer must not merge into the prompt
            raise RuntimeError(f"internal: prompt {prompts[i]!r} is not a token prefix of its answer")
        labels[i, :n] = -100
    return {k: v.to(device) for k, v in {**full, "labels": labels}.items()}


def training_batch(world, recipe: Recipe, step: int) -> tuple[list[tuple[Any, str, str]], list, list]:
    """Stage 2's examples ``[step * batch_size, (step + 1) * batch_size)`` of the training stream.

    Every ``1 / caption_rate``-th step asks for captions instead of answers: they name every
    object's size, colour and shape, a dense signal about what the questions are about. Whole steps,
    so that one-word answers are not padded to a caption's length.

    Returns:
        The (image, prompt, answer) triples; per example the question it answers (``None`` for a
        caption), for the answer-position targets; and per example its scene.
    """
    questions = world.training_questions(recipe.batch_size, start=step * recipe.batch_size,
                                         mix=recipe.tasks)
    every = round(1 / recipe.caption_rate) if recipe.caption_rate > 0 else 0
    scenes = [q.scene for q in questions]
    if every and step % every == every - 1:
        captions = [(q.image, CAPTION_PROMPT, world.caption(q.scene)) for q in questions]
        return captions, [None] * len(questions), scenes
    return [(q.image, q.prompt, q.answer) for q in questions], questions, scenes


def _template(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _save_state(folder: Path, modules: dict[str, torch.nn.Module], optimizer, step: int,
                losses: list[float]) -> None:
    """Write modules, optimiser moments and progress to a temporary folder, then swap it in."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp / f"{name}.safetensors")
    moments = {}
    for i, param in enumerate(_params(optimizer) if optimizer is not None else []):
        for key, value in optimizer.state.get(param, {}).items():
            moments[f"{i}.{key}"] = value.detach().reshape(-1) if key == "step" else value
    save_file(moments, tmp / "optimizer.safetensors")
    (tmp / "progress.json").write_text(json.dumps({"step": step, "losses": losses}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _load_state(folder: Path, modules: dict[str, torch.nn.Module], optimizer) -> list[float]:
    for name, module in modules.items():
        module.load_state_dict(load_file(folder / f"{name}.safetensors"))
    moments = load_file(folder / "optimizer.safetensors")
    for i, param in enumerate(_params(optimizer)):
        state = {key.split(".", 1)[1]: value for key, value in moments.items() if key.split(".", 1)[0] == str(i)}
        if state:
            state["step"] = state["step"].reshape(())
            optimizer.state[param] = state
    return json.loads((folder / "progress.json").read_text())["losses"]


def _saved_step(folder: Path) -> int:
    progress = folder / "progress.json"
    return json.loads(progress.read_text())["step"] if progress.exists() else 0


def _params(optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _schedule(peak: float, warmup: int, steps: int, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    out: str | Path,
    recipe: Recipe | None = None,
    *,
    device: str | torch.device | None = None,
    checkpoint_every: int = 250,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train shapes-llava and save it in Hugging Face format.

    Args:
        out: output folder; it receives the model, processor, ``recipe.json`` and
            ``training.json`` (losses, time). A ``train_state`` subfolder there resumes a run.
        recipe: the settings (default: the recipe of the shipped checkpoint).
        device: where to train (default CUDA when available).
        checkpoint_every: steps between resumable checkpoints.
        progress: show a progress bar.
        on_step: called as ``on_step(step, loss)`` after each optimiser step (logging, early stop).

    Returns:
        The output folder.
    """
    from ..devices import resolve_device

    recipe = recipe or Recipe()
    if recipe.steps < 1 or recipe.batch_size < 1 or recipe.vision_steps < 0:
        raise InputError(f"steps and batch_size must be >= 1 and vision_steps >= 0, got {recipe.steps}, "
                         f"{recipe.batch_size} and {recipe.vision_steps}")
    n_layers = recipe.text["num_hidden_layers"]
    if recipe.answer_heads_weight and not 0 <= recipe.answer_heads_layer < n_layers:
        raise InputError(f"answer_heads_layer must be in [0, {n_layers - 1}] for a {n_layers}-layer language "
                         f"model (its comparisons read one layer later), got {recipe.answer_heads_layer}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    world = recipe.training_world()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model, processor = build_untrained(recipe)
        cfg = world.config
        grid = recipe.world["image_size"] // recipe.vision["patch_size"]
        heads = PatchHeads(model.config.vision_config.hidden_size, len(cfg.shapes), len(cfg.colors),
                           len(cfg.sizes), grid, recipe.vision_shape_weight)
        answer_heads = AnswerHeads(model.config.text_config.hidden_size, len(cfg.colors), len(cfg.sizes),
                                   recipe.answer_heads_layer) if recipe.answer_heads_weight else None
    model.to(device)
    heads.to(device)
    state_dir = out / STATE
    total = recipe.vision_steps + recipe.steps
    done = _saved_step(state_dir)
    started = time.time()
    bar = tqdm(total=total, initial=done, desc="training shapes-llava", disable=not progress)
    losses: list[float] = []
    tower = model.model.vision_tower

    # Stage 1: the vision tower learns per-patch shape, colour and size; the projector maps each
    # patch onto the word embeddings naming its object.
    projector = model.model.multi_modal_projector
    words = word_table(cfg, processor.tokenizer, model.get_input_embeddings())
    basis = position_basis(processor.tokenizer, model.get_input_embeddings()) if recipe.position_code else None
    if done < recipe.vision_steps:
        vision_world = recipe.vision_training_world()
        params = list(tower.parameters()) + list(heads.parameters()) + list(projector.parameters())
        optimizer = torch.optim.AdamW(params, lr=recipe.vision_lr, weight_decay=recipe.weight_decay)
        modules = {"model": model, "heads": heads}
        if done:
            losses = _load_state(state_dir, modules, optimizer)
        tower.train()
        for step in range(done, recipe.vision_steps):
            scenes = [q.scene for q in vision_world.training_questions(
                recipe.vision_batch_size, start=VISION_STREAM + step * recipe.vision_batch_size)]
            images = [scene.render() for scene in scenes]
            pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)
            targets = patch_targets(cfg, scenes, grid).to(device)
            for group in optimizer.param_groups:
                group["lr"] = _schedule(recipe.vision_lr, recipe.warmup, recipe.vision_steps, step)
            loss = vision_loss(tower, heads, pixels, targets, projector, words, basis)
            _step(optimizer, loss, params)
            losses.append(round(loss.item(), 5))
            _report(bar, losses, "vision", on_step, step)
            if (step + 1) % checkpoint_every == 0:
                _save_state(state_dir, modules, optimizer, step + 1, losses)
        done = recipe.vision_steps
        _save_state(state_dir, modules, None, done, losses)  # stage 2 starts a fresh optimiser

    # Stage 2: projector and language model on the frozen tower, on questions and captions, with
    # the answer-position heads beside them.
    tower.requires_grad_(False)
    tower.eval()
    params = [p for name, p in model.named_parameters() if not name.startswith("model.vision_tower.")]
    modules: dict[str, torch.nn.Module] = {"model": model}
    if answer_heads is not None:
        answer_heads.to(device)
        params += list(answer_heads.parameters())
        modules["answer_heads"] = answer_heads
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if done:  # the answer heads have a state once stage 2 has begun
        losses = _load_state(state_dir, modules if done > recipe.vision_steps else {"model": model}, optimizer)
    model.model.multi_modal_projector.train()
    model.model.language_model.train()
    for step in range(done - recipe.vision_steps, recipe.steps):
        examples, asked, scenes = training_batch(world, recipe, step)
        batch = collate(processor, examples, device)
        targets = answer_targets(cfg, asked)
        for group in optimizer.param_groups:
            group["lr"] = _schedule(recipe.lr, recipe.warmup, recipe.steps, step)
        aligned = recipe.projector_alignment_weight
        # the alignment term reads the patches this forward projects
        with _outputs(projector) if aligned else contextlib.nullcontext() as projected:
            loss = example_mean_loss(model, batch, answer_heads, targets, recipe.answer_heads_weight)
        if aligned:
            loss = loss + aligned * _projector_alignment(
                model, processor, cfg, scenes, projected[0], grid, recipe.position_code)
        _step(optimizer, loss, params)
        losses.append(round(loss.item(), 5))
        _report(bar, losses, "answers", on_step, recipe.vision_steps + step)
        if (step + 1) % checkpoint_every == 0 and step + 1 < recipe.steps:
            _save_state(state_dir, modules, optimizer, recipe.vision_steps + step + 1, losses)
    bar.close()
    model.eval()
    processor.tokenizer.padding_side = "left"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # the default recipe is what the CLI trains; any other is reproduced from this file's fields
    command = (f"{COMMAND} --out {out}" if recipe == Recipe()
               else f"lvlm_probe.zoo.train.train({str(out)!r}, Recipe.from_dict(<this file>))")
    (out / "recipe.json").write_text(json.dumps({"command": command, **recipe.to_dict()}, indent=2))
    (out / "training.json").write_text(json.dumps(
        {"losses": losses, "seconds_this_run": round(time.time() - started, 1),
         "torch": torch.__version__, "threads": torch.get_num_threads()}))
    shutil.rmtree(state_dir, ignore_errors=True)
    return out


def example_mean_loss(model, batch: dict[str, torch.Tensor], answer_heads: AnswerHeads | None = None,
                      targets: torch.Tensor | None = None, weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over each example's answer tokens, then over examples; plus
    ``weight`` times the loss of ``answer_heads`` on ``targets`` when given.

    HF's loss averages over all tokens of the batch, which would let a 20-token caption outweigh a
    one-word answer twentyfold; here every example counts the same.
    """
    labels = batch["labels"]
    out = model(**{k: v for k, v in batch.items() if k != "labels"},
                output_hidden_states=answer_heads is not None)
    logits, next_tokens = out.logits[:, :-1], labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), next_tokens.flatten(), ignore_index=-100, reduction="none"
    ).view_as(next_tokens)
    counted = (next_tokens != -100).sum(1).clamp_min(1)
    loss = (per_token.sum(1) / counted).mean()
    if answer_heads is not None:
        loss = loss + weight * answer_heads.loss(out.hidden_states, labels, targets)
    return loss


def _projector_alignment(model, processor, cfg, scenes, projected: torch.Tensor, grid: int,
                         position_code: bool) -> torch.Tensor:
    """Stage 1's projector alignment loss on a stage-2 batch's projected patches, against the word
    embeddings as they are now (stage 2 trains them too)."""
    embed = model.get_input_embeddings()
    words = word_table(cfg, processor.tokenizer, embed)
    basis = position_basis(processor.tokenizer, embed) if position_code else None
    targets = patch_targets(cfg, scenes, grid).to(projected.device)
    return alignment_loss(projected, targets, words, grid, basis)


@contextlib.contextmanager
def _outputs(module: torch.nn.Module):
    """Collect ``module``'s outputs while the block runs (the hook is removed on exit)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, _args, output: seen.append(output))
    try:
        yield seen
    finally:
        handle.remove()


def _step(optimizer, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def _report(bar, losses: list[float], stage: str, on_step, step: int) -> None:
    recent = losses[-50:]
    bar.set_postfix(stage=stage, loss=f"{sum(recent) / len(recent):.4f}")
    bar.update(1)
    if on_step is not None:
        on_step(step, losses[-1])
