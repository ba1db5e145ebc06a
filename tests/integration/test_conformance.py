"""Family conformance: every registered family, on its tiny random-weight model (the real
transformers classes and processor), has the properties the rest of lvlm_probe relies on. Adding a
family is an adapter, a tiny builder and this module passing.

Each family's model is built, saved and reloaded once (module-scoped fixture); every check below
runs on the reloaded model. A family that cannot do something declares it on its adapter
(``nonlinear_writes``, ``image_mode``, ``cross_attention_layers``, ``unmasked_mixing_layers``) and
the check then expects the declared behaviour or error instead of skipping.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from conftest import PROMPTS, random_image, store_files

import lvlm_probe as lp
from lvlm_probe import fileio
from lvlm_probe.attribution import dla, knockout, logit_lens, source_split
from lvlm_probe.attribution.generation import COALITIONS as GENERATION_COALITIONS
from lvlm_probe.attribution.lens import unembed
from lvlm_probe.circuits import editing, patch
from lvlm_probe.circuits.patching import Site, run_sites
from lvlm_probe.errors import InputError, StoreError
from lvlm_probe.hooks import attention
from lvlm_probe.layout import GROUPS

FAMILIES = lp.families.names()
RESID = "blocks.*.hook_resid_post"
# Two prompts of the same token count in every tiny tokenizer, sharing only their first word and
# final "?": hiding the prompt must make the score independent of which one it was.
PROMPT = "Is there a red heart in the image?"
OTHER_PROMPT = "Is the blue star above a green circle?"
# Smallest change of the full score (log-odds) that counts as "the input reaches the answer".
REACHES = 1e-4


@dataclass
class Subject:
    """One family's reloaded tiny model and the batches the checks share."""

    model: Any
    original: Any  # the tiny model before save_pretrained -> lp.load
    batch: Any  # two examples, different prompt lengths and image sizes (padded)
    yes: int
    no: int


@pytest.fixture(scope="module", params=FAMILIES)
def subject(request, tmp_path_factory) -> Subject:
    """tiny(family) -> save_pretrained(dir) -> lp.load(dir), built once per family."""
    family = request.param
    original = lp.zoo.tiny(family, device="cpu")
    path = original.save_pretrained(tmp_path_factory.mktemp(family))
    model = lp.load(path, device="cpu")
    batch = model.prepare(images=[[random_image(40, 56, seed=1)], [random_image(72, 48, seed=2)]],
                          prompts=PROMPTS)
    # the first token of each answer (the tiny tokenizers split "yes" after some templates)
    yes, no = (model.continuation_tokens(batch, 0, answer)[0] for answer in ("yes", "no"))
    assert yes != no
    return Subject(model, original, batch, yes, no)


def _hidden_states(out):
    # BLIP-2 nests the language model's output; the others return hidden_states at the top level
    return getattr(out, "language_model_outputs", out).hidden_states


def _restoring_layers(model) -> list[int]:
    """Layers whose residual stream, patched whole, fixes the rest of the run: after the last
    layer that reads the image outside the residual stream (cross-attention) or adds it to the
    residual stream outside attention (DeepStack)."""
    outside = model.family.cross_attention_layers(model.config) + model.family.image_injection_layers(model.config)
    first = max(outside) + 1 if outside else 0
    return list(range(first, model.n_layers))


# --- loading and layout ------------------------------------------------------------------------

def test_save_load_round_trip_gives_identical_logits(subject):
    model, original, batch = subject.model, subject.original, subject.batch
    assert type(model.hf) is type(original.hf) and model.family.name == original.family.name
    again = original.prepare(images=batch.images, prompts=batch.prompts)  # the saved processor
    assert torch.equal(again.input_ids, batch.input_ids)
    for key, value in batch.inputs.items():
        if torch.is_tensor(value):
            assert torch.equal(again.inputs[key], value), key
    with torch.no_grad():
        expected = original.hf(**batch.inputs).logits
    assert torch.equal(model.forward(batch).logits, expected)


def test_every_layer_mixes_tokens_as_declared(subject):
    """Each language-model layer holds the module its declared kind names: self-attention
    (``lm_attn``), cross-attention (``cross_attention_layers``), or a token mixer without an
    attention mask (``unmasked_mixing_layers``, module ``lm_mixer``) and then no ``lm_attn``, so
    nothing can mistake it for a layer whose keys can be masked."""
    model = subject.model
    family, layers = model.family, model.module(model.family.lm_layers)
    cross = family.cross_attention_layers(model.config)
    unmasked = family.unmasked_mixing_layers(model.config)
    attending = family.self_attention_layers(model.config)
    assert not set(cross) & set(unmasked)
    assert sorted(attending + cross + unmasked) == list(range(model.n_layers))
    for layer in attending:
        layers[layer].get_submodule(family.lm_attn)
    for layer in unmasked:
        assert family.lm_mixer is not None
        layers[layer].get_submodule(family.lm_mixer)
        with pytest.raises(AttributeError):
            layers[layer].get_submodule(family.lm_attn)


def _image_sets(model) -> list[list[list[Any]]]:
    """Batches' images: one image per example (padded batch), and two in one example where the
    family takes several."""
    sets = [[[random_image(40, 56, seed=1)], [random_image(72, 48, seed=2)]]]
    if model.family.multi_image:
        sets.append([[random_image(40, 56, seed=1), random_image(72, 48, seed=2)]])
    return sets


def test_layout_accounts_for_every_position(subject):
    """The processor called directly gives the same inputs and logits; every position is in
    exactly one group; every image position is a grid cell or a separator of exactly one of its
    example's images; the prompt positions spell the prompt."""
    model = subject.model
    for images in _image_sets(model):
        prompts = PROMPTS[:len(images)]
        batch = model.prepare(images=images, prompts=prompts)
        kwargs = dict(model.family.processor_kwargs())
        if model.tokenizer.bos_token and all(t.startswith(model.tokenizer.bos_token) for t in batch.texts):
            kwargs["add_special_tokens"] = False  # the template wrote BOS already
        direct = model.processor(text=batch.texts, images=model.family.processor_images(images),
                                 return_tensors="pt", padding=True, **kwargs)
        direct = model.family.model_inputs(direct)  # what prepare adds for the model (position ids)
        assert torch.equal(direct["input_ids"], batch.input_ids)
        with torch.no_grad():
            expected = model.hf(**direct).logits
        assert torch.equal(model.forward(batch).logits, expected)

        for i, (layout, prompt) in enumerate(zip(batch.layouts, prompts)):
            ids = batch.input_ids[i]
            assert layout.length == ids.numel()
            every = torch.cat([layout.groups[g] for g in GROUPS]).sort().values
            assert torch.equal(every, torch.arange(layout.length)), f"example {i}: groups overlap or miss"
            valid = batch.inputs["attention_mask"][i].bool()
            assert torch.equal(layout.positions("pad"), (~valid).nonzero().flatten())
            # the image positions are exactly the (non-pad) placeholder tokens
            placeholders = ((ids == model.image_token_id) & valid).nonzero().flatten()
            assert torch.equal(layout.positions("image"), placeholders)
            assert len(layout.images) == len(images[i])
            cells = [img.positions for img in layout.images]
            for img in layout.images:
                assert img.grids or img.separators, f"example {i}: image {img.index} has no position"
                counted = [g.positions.reshape(-1) for g in img.grids] + list(img.separators.values())
                flat = torch.cat(counted)
                assert flat.unique().numel() == flat.numel(), f"example {i}: a position counted twice"
            every_cell = torch.cat(cells)
            assert every_cell.unique().numel() == every_cell.numel(), f"example {i}: images share a position"
            assert torch.equal(every_cell.sort().values, placeholders)
            # the prompt positions decode to the prompt (up to the space a token carries before it)
            decoded = model.tokenizer.decode(ids[layout.positions("prompt")])
            assert decoded.strip() == prompt, (decoded, prompt)


# --- capture -----------------------------------------------------------------------------------

def test_capture_never_changes_logits(subject):
    model, batch = subject.model, subject.batch
    expected = model.forward(batch).logits
    # patterns and scores switch attention to eager: tests/integration/test_capture_attention.py
    names = [n for n in model.hook_names() if not n.endswith(("hook_pattern", "hook_attn_scores"))]
    with model.capture(names) as cache:
        logits = model.forward(batch).logits
    assert torch.equal(logits, expected)
    assert cache.names() and set(cache.names()) == set(names)  # every offered hook ran once


def test_resid_post_equals_hf_hidden_states(subject):
    model, batch = subject.model, subject.batch
    out = model.forward(batch, output_hidden_states=True)
    hidden = _hidden_states(out)
    assert len(hidden) == model.n_layers + 1
    with model.capture([RESID, "ln_final.hook_normalized", "ln_final.hook_out"]) as cache:
        logits = model.forward(batch).logits
    assert torch.equal(logits, out.logits)
    resid = cache.stack(RESID)
    assert resid.shape == (model.n_layers, *hidden[0].shape)
    for layer in range(model.n_layers - 1):
        assert torch.equal(resid[layer], hidden[layer + 1]), f"layer {layer}"
    # Every family's HF model puts the final norm's output, not the last layer's output, in the
    # last entry of hidden_states. So the last layer is compared through the final norm module:
    # applied to the captured resid_post it gives hidden_states[-1], as does ln_final.hook_out.
    norm = model.module(model.family.lm_norm)
    with torch.no_grad():
        torch.testing.assert_close(norm(resid[-1]), hidden[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["ln_final.hook_out"], hidden[-1], atol=1e-5, rtol=0)
    # hook_normalized is the same before the norm's learned scale (and bias): the norm's affine
    # map applied to it gives hook_out
    normed = cache["ln_final.hook_normalized"]
    with torch.no_grad():
        if isinstance(norm, torch.nn.LayerNorm):
            affine = normed * norm.weight + norm.bias
        else:
            affine = normed * (model.family.final_norm_weight_offset(norm) + norm.weight)
    torch.testing.assert_close(affine, cache["ln_final.hook_out"], atol=1e-5, rtol=0)
    assert not torch.allclose(resid[-1], hidden[-1], atol=1e-3)  # the norm did change it


# --- store -------------------------------------------------------------------------------------

def test_interrupted_extract_resumes_byte_identical(subject, tmp_path, monkeypatch):
    """A full disk half-way through shard 1's tensors, then the same call again: the store equals
    an uninterrupted extraction byte for byte."""
    model = subject.model
    sizes = [(40, 56), (72, 48)]
    rows = [{"id": f"ex{i}", "prompt": PROMPTS[i % 2], "image": random_image(*sizes[i % 2], seed=10 + i),
             "label": i % 3} for i in range(6)]
    attn = model.family.self_attention_layers(model.config)[0]
    args = dict(hooks=[RESID, f"blocks.{attn}.attn.hook_z"], positions="image", reduce="mean", batch_size=2,
                shard_size=2, progress=False)
    reference = lp.extract(model, rows, out=tmp_path / "reference", **args)
    assert reference.complete and reference.ids == [r["id"] for r in rows]

    write, calls = fileio._write_all, []

    def full(fd, data):  # writes: header, shard 0 tensors, shard 0 manifest, shard 1 tensors, ...
        calls.append(len(data))
        if len(calls) == 4:
            write(fd, memoryview(data)[: len(data) // 2])  # a partial file, as a real full disk leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(fd, data)

    monkeypatch.setattr(fileio, "_write_all", full)
    with pytest.raises(StoreError, match="disk is full"):
        lp.extract(model, rows, out=tmp_path / "s", **args)
    monkeypatch.setattr(fileio, "_write_all", write)
    partial = lp.ActivationStore.open(tmp_path / "s")
    assert partial.ids == ["ex0", "ex1"] and not partial.complete
    store = lp.extract(model, rows, out=tmp_path / "s", **args)
    assert store.complete and store.ids == reference.ids
    assert store_files(tmp_path / "s") == store_files(tmp_path / "reference")
    for hook in reference.hooks:
        assert torch.equal(store[hook], reference[hook]), hook


# --- attribution -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split(subject):
    """source_split of three examples: 0 and 1 differ only in their image (same size), 0 and 2
    only in their prompt (same token count)."""
    model = subject.model
    image, other = random_image(48, 48, seed=1), random_image(48, 48, seed=2)
    batch = model.prepare(images=[[image], [other], [image]], prompts=[PROMPT, PROMPT, OTHER_PROMPT])
    lengths = [lay.positions("prompt").numel() for lay in batch.layouts]
    assert lengths[0] == lengths[2], f"the two prompts must have one token count, got {lengths}"
    assert not batch.layouts[0].positions("pad").numel() and not batch.layouts[2].positions("pad").numel()
    return batch, source_split(model, batch, target=subject.yes, foil=subject.no)


def test_source_split_is_exact(subject, split):
    model, (batch, result) = subject.model, split
    # efficiency: the three sources add up to the full score, which is the model's own log-odds
    torch.testing.assert_close(result.prior + result.prompt + result.image, result.full, atol=1e-5, rtol=0)
    reference = model.answer_logprobs(batch, [subject.yes, subject.no]).cpu()
    torch.testing.assert_close(result.full, reference[:, 0] - reference[:, 1], atol=1e-4, rtol=0)
    assert attention.active() == (0, 0)  # the implementation switched back
    # both players reach the answer, so the removal checks below are not vacuous
    assert abs(float(result.full[0] - result.full[1])) > REACHES, "the image does not change the answer"
    assert abs(float(result.full[0] - result.full[2])) > REACHES, "the prompt does not change the answer"


def test_hidden_image_is_removed(subject, split):
    """With the image hidden, the score does not depend on the image: two different images of the
    same size give the same value of the coalition without the image (the prompt alone), and of
    the empty coalition."""
    _, result = split
    for coalition in ("prompt", "empty"):
        values = result.values[coalition]
        torch.testing.assert_close(values[0], values[1], atol=1e-6, rtol=0, msg=coalition)


def test_hidden_prompt_is_removed(split):
    """With the prompt hidden, the score does not depend on the prompt's words: two prompts of the
    same token count give the same value of the coalition without the prompt (the image alone),
    and of the empty coalition."""
    _, result = split
    for coalition in ("image", "empty"):
        values = result.values[coalition]
        torch.testing.assert_close(values[0], values[2], atol=1e-6, rtol=0, msg=coalition)


def test_knockout_blocks_attention_or_raises_where_layers_mix_without_a_mask(subject):
    """Attention knockout blocks keys from some queries only, which a layer that mixes tokens
    without an attention mask cannot do: a window over such a layer raises naming the family and
    the layers; windows of self-attention layers run, and their unblocked run is the model's own."""
    model, batch, yes = subject.model, subject.batch, subject.yes
    unmasked = model.family.unmasked_mixing_layers(model.config)
    if unmasked:
        with pytest.raises(InputError, match=re.escape(f"{model.family.name}'s layers {unmasked}")):
            knockout(model, batch, target=yes, source="prompt")
    layers = model.family.self_attention_layers(model.config)
    curve = knockout(model, batch, target=yes, source="prompt", layers=layers, window=1).to_frame()
    assert sorted(set(curve["layer"])) == layers
    with torch.no_grad():
        probs = torch.softmax(model.forward(batch).logits[:, -1].float(), dim=-1)[:, yes].cpu()
    np.testing.assert_allclose(curve.groupby("example")["p"].first().to_numpy(), probs.numpy(), atol=1e-5)


def test_logit_lens_last_layer_is_the_model_output(subject):
    model, batch = subject.model, subject.batch
    positions = "prompt" if model.family.image_mode == "cross_attention" else "image"
    lens = logit_lens(model, batch, positions=positions, k=3)
    assert lens.top_ids.shape[:2] == (model.n_layers, len(batch)) and lens.top_ids.shape[-1] == 3
    with model.capture(f"blocks.{model.n_layers - 1}.hook_resid_post") as cache:
        logits = model.forward(batch).logits.float()
    torch.testing.assert_close(unembed(model, cache[f"blocks.{model.n_layers - 1}.hook_resid_post"]),
                               logits, atol=1e-5, rtol=0)
    probs = torch.softmax(logits, dim=-1)
    for i in range(len(batch)):
        kept = lens.positions[i][lens.positions[i] >= 0]
        assert kept.numel() == batch.layouts[i].positions(positions).numel()
        expected_probs, expected_ids = probs[i, kept].topk(3, dim=-1)
        n = len(kept)
        torch.testing.assert_close(lens.top_probs[-1, i, :n], expected_probs, atol=1e-5, rtol=0)
        assert torch.equal(lens.top_ids[-1, i, :n, 0], expected_ids[:, 0])
    assert (lens.top_probs[..., :-1] >= lens.top_probs[..., 1:]).all()  # most probable first
    assert len(lens.tokens(layer=0, example=0)) == int((lens.positions[0] >= 0).sum())


def test_dla_terms_sum_to_the_logit_difference(subject):
    model, batch, yes, no = subject.model, subject.batch, subject.yes, subject.no
    declared = model.family.nonlinear_writes
    if declared is not None:
        with pytest.raises(InputError, match=re.escape(declared)):
            dla(model, batch, target=yes, foil=no)
        return
    if model.family.final_logit_softcap(model.config) is not None:
        with pytest.raises(InputError, match="soft cap"):
            dla(model, batch, target=yes, foil=no)
        return
    result = dla(model, batch, target=yes, foil=no)
    with torch.no_grad():
        last = model.forward(batch).logits[:, -1].float()
    np.testing.assert_allclose(result.logit.numpy(), (last[:, yes] - last[:, no]).numpy(), atol=1e-5)
    logprobs = model.answer_logprobs(batch, [yes, no]).cpu()
    expected = (logprobs[:, 0] - logprobs[:, 1]).numpy()  # log-odds = logit difference
    np.testing.assert_allclose(result.logit.numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(result.by_source()["total"].to_numpy(), expected, atol=1e-4)
    heads = result.terms[result.terms["component"] == "head"]
    assert len(heads) == len(batch) * model.n_layers * model.n_heads * 3  # every head x source


# --- patching ----------------------------------------------------------------------------------

def test_patching_everything_restores_and_nothing_leaves_the_corrupted_run(subject):
    """Same prompts and image sizes, other pixels (equal token layouts). Patching a layer's whole
    resid_pre restores the clean run (metric 1) at every layer after the last one that reads the
    image outside the residual stream; an empty patch leaves the corrupted run (metric 0)."""
    model, clean = subject.model, subject.batch
    corrupted = model.prepare(images=[[random_image(40, 56, seed=11)], [random_image(72, 48, seed=12)]],
                              prompts=clean.prompts)
    answers = (subject.yes, subject.no)  # metric: yes - no logit difference
    layers = _restoring_layers(model)
    # where every layer is declared (Gemma 4 with per-layer embeddings and KV-shared layers) no
    # layer's stream carries the whole run, and the checks below expect every layer unrestored
    declared = model.family.cross_attention_layers(model.config) + model.family.image_injection_layers(model.config)
    assert layers or sorted(set(declared)) == list(range(model.n_layers)), \
        "no layer's residual stream carries the whole run"
    with torch.no_grad(), model.capture("blocks.*.hook_resid_pre") as cache:
        clean_logits = model.forward(clean).logits[:, -1]
    with torch.no_grad():
        corrupted_logits = model.forward(corrupted).logits[:, -1]
        with editing(model, {}):
            assert torch.equal(model.forward(corrupted).logits[:, -1], corrupted_logits)
        for layer in layers:
            name = f"blocks.{layer}.hook_resid_pre"
            with editing(model, {name: lambda x, name=name: cache[name]}):
                patched = model.forward(corrupted).logits[:, -1]
            torch.testing.assert_close(patched, clean_logits, atol=1e-4, rtol=1e-4)

    table = patch(model, clean, corrupted, "blocks.*.hook_resid_pre", positions="all", answers=answers,
                  per_example=True)
    assert sorted(set(table["layer"])) == list(range(model.n_layers))
    restored = table[table["layer"].isin(layers)]
    np.testing.assert_allclose(restored["metric"], 1.0, atol=1e-3)
    np.testing.assert_allclose(restored["value"], np.tile(table.attrs["clean"], len(layers)), atol=1e-4)
    # before a layer that reads the image outside the residual stream, the stream does not carry
    # the whole run: the declared cross-attention layers really read the image
    unrestored = table[~table["layer"].isin(layers)]
    assert len(unrestored) == len(clean) * (model.n_layers - len(layers))
    if len(unrestored):
        assert not np.allclose(unrestored["metric"], 1.0, atol=1e-3)

    # patching no position at any layer, in one batched pass with the whole-stream sites
    points = lp.hooks.hook_points(model)
    n, length = corrupted.input_ids.shape
    empty, full = torch.zeros(n, length, dtype=torch.bool), torch.stack([lay.mask("all") for lay in corrupted.layouts])
    sites = [Site(points[f"blocks.{layer}.hook_resid_pre"], label, mask)
             for layer in range(model.n_layers) for label, mask in (("none", empty), ("all", full))]
    sources = {f"blocks.{layer}.hook_resid_pre": cache[f"blocks.{layer}.hook_resid_pre"]
               for layer in range(model.n_layers)}
    scores = run_sites(model, corrupted, sites, sources, lambda logits: logits[:, subject.yes] - logits[:, subject.no])
    corrupted_score = (corrupted_logits[:, subject.yes] - corrupted_logits[:, subject.no]).float()
    clean_score = (clean_logits[:, subject.yes] - clean_logits[:, subject.no]).float()
    for s, site in enumerate(sites):
        expected = corrupted_score if site.label == "none" else clean_score
        if site.label == "all" and site.point.layer not in layers:
            continue
        torch.testing.assert_close(scores[s], expected, atol=1e-4, rtol=0, msg=f"{site.point.name} {site.label}")


# --- generation ----------------------------------------------------------------------------------

# a continuation of a caption's shape, tokenized by each family's own tokenizer
CAPTION = "a red heart above a blue star and a green circle"


@pytest.fixture(scope="module")
def generation(subject):
    """Five greedy tokens of the subject's batch, every position's residual stream kept."""
    return subject.model.generate(subject.batch, 5, capture=RESID, positions="all")


def test_teacher_forced_text_reproduces_generation(subject, generation):
    """The generated text run teacher-forced gives each token the log-probability it had when it
    was generated (with the KV cache), and the activations captured during generation are those
    of the teacher-forced run at every real position."""
    model, batch = subject.model, subject.batch
    ids = generation.token_ids
    start = batch.input_ids.shape[1]
    with torch.no_grad(), model.capture(RESID) as cache:
        logits = model.run(model.continued(batch, ids)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1).cpu()
    for i, row in enumerate(ids):
        forced = logprobs[i, start - 1 + torch.arange(len(row)), torch.tensor(row)]
        torch.testing.assert_close(forced, generation.logprobs[i], atol=1e-5, rtol=0)
    # generation feeds every token but the last through the model
    ran = start + min(len(row) for row in ids) - 1
    real = model.continued(batch, ids)["attention_mask"][:, :ran].bool().cpu()
    captured, forced = generation.cache.stack(RESID)[:, :, :ran], cache.stack(RESID)[:, :, :ran]
    scale = forced.abs().amax()
    torch.testing.assert_close((captured - forced)[:, real].abs().amax() / scale, torch.tensor(0.0),
                               atol=1e-5, rtol=0)


def test_generation_split_is_exact_or_raises(subject, generation):
    """Per generated token: prior + prompt + image + generated = the token's log-probability,
    which is the one seen during generation; the first token has no earlier words. Families whose
    layers mix tokens without a mask cannot hide earlier words from one reader only: they raise."""
    model, batch = subject.model, subject.batch
    unmasked = model.family.unmasked_mixing_layers(model.config)
    if unmasked:
        with pytest.raises(InputError, match=f"{model.family.name} mixes tokens without an attention mask"):
            lp.attribution.explain_generation(model, batch, continuation=generation.token_ids)
        return
    split = lp.attribution.explain_generation(model, batch, continuation=generation.token_ids, batch_size=3)
    assert split.passes == 8  # 3 rows per pass: one coalition of two examples each
    total = split.prior + split.prompt + split.image + split.generated
    for i, row in enumerate(generation.token_ids):
        n = len(row)
        torch.testing.assert_close(total[i, :n], split.full[i, :n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(split.full[i, :n], generation.logprobs[i], atol=1e-5, rtol=0)
    assert torch.equal(split.generated[:, 0], torch.zeros(len(batch)))
    assert attention.active() == (0, 0)


def test_hidden_earlier_words_are_removed(subject):
    """Without the generated player, token 3's score does not depend on the continuation's first
    two tokens (the earlier words; token 2 is the reader): two continuations differing only there
    give the same value of every coalition without it, and different full scores (the words reach
    the token)."""
    model, batch = subject.model, subject.batch
    ids = [model.continuation_tokens(batch, i, CAPTION)[:4] for i in range(len(batch))]
    if model.family.unmasked_mixing_layers(model.config):  # declared: no removal per reader
        with pytest.raises(InputError, match="cannot be removed per token"):
            lp.attribution.explain_generation(model, batch, continuation=ids)
        return
    other = [[subject.yes, subject.no, *row[2:]] for row in ids]
    assert all(row[:2] != [subject.yes, subject.no] for row in ids)
    a, b = (lp.attribution.explain_generation(model, batch, continuation=c) for c in (ids, other))
    for k, coalition in enumerate(GENERATION_COALITIONS):
        if not coalition[2]:  # (image, prompt, generated) present
            torch.testing.assert_close(a.values[k, :, 3], b.values[k, :, 3], atol=1e-6, rtol=0, msg=str(coalition))
    assert (a.values[0, :, 3] - b.values[0, :, 3]).abs().max() > REACHES, "the earlier word does not reach the token"
