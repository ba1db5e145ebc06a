"""Activation and path patching and head attribution on shapes-llava: exact at the sanity points,
localised where the model reads colour, and hooks removed even when a run raises."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from einops import einsum, rearrange

import lvlm_probe as lp
from lvlm_probe.attribution.lens import unembed
from lvlm_probe.circuits import (
    check_pair,
    editing,
    head_attribution,
    pair_batches,
    patch,
    path_patch,
)
from lvlm_probe.circuits.patching import Site, run_sites
from lvlm_probe.errors import HookNameError, InputError, LVLMProbeError


@pytest.fixture(scope="module")
def model():
    return lp.zoo.load("shapes-llava", device="cpu")


@pytest.fixture(scope="module")
def pair(model):
    """Eight colour pairs: same scene and prompt, the asked object's colour changed."""
    pairs = lp.worlds.ShapesWorld(seed=0, image_size=64).pairs(8, change="color")
    return pair_batches(model, pairs)


@pytest.fixture(scope="module")
def resid_table(model, pair):
    clean, corrupted, answers = pair
    return patch(model, clean, corrupted, "blocks.*.hook_resid_pre",
                 positions=["all", "image", "prompt", "last"], answers=answers)


def hook_counts(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())


def last_logits(model, batch):
    with torch.no_grad():
        return model.forward(batch).logits[:, -1]


# --- sanity points -----------------------------------------------------------------------------
def test_patching_every_position_at_layer_0_restores_the_clean_logits(model, pair, resid_table):
    clean, corrupted, _ = pair
    with model.capture("blocks.0.hook_resid_pre") as cache:
        clean_logits = last_logits(model, clean)
    with editing(model, {"blocks.0.hook_resid_pre": lambda x: cache["blocks.0.hook_resid_pre"]}):
        patched = last_logits(model, corrupted)
    torch.testing.assert_close(patched, clean_logits, atol=1e-5, rtol=0)
    row = resid_table[(resid_table["layer"] == 0) & (resid_table["positions"] == "all")]
    assert row["metric"].item() == pytest.approx(1.0, abs=1e-5)
    assert row["value"].item() == pytest.approx(resid_table.attrs["clean"], abs=1e-4)


def test_patching_nothing_leaves_the_corrupted_logits(model, pair, resid_table):
    clean, corrupted, answers = pair
    reference = last_logits(model, corrupted)
    with editing(model, {}):
        assert torch.equal(last_logits(model, corrupted), reference)
    # a site that selects no position, run in a batched pass with a real one
    with model.capture("blocks.0.hook_resid_pre") as cache:
        model.forward(clean)
    point = lp.hooks.hook_points(model)["blocks.0.hook_resid_pre"]
    empty = torch.zeros(corrupted.input_ids.shape, dtype=torch.bool)
    full = torch.stack([lay.mask("all") for lay in corrupted.layouts])
    rows = run_sites(model, corrupted, [Site(point, "none", empty), Site(point, "all", full)],
                     {point.name: cache[point.name]}, lambda logits: logits[:, 0])
    torch.testing.assert_close(rows[0], reference[:, 0], atol=1e-5, rtol=0)
    # the prompt comes before the image in shapes-llava's template, so at every layer it is the
    # same in both runs: patching it restores nothing
    prompt = resid_table[resid_table["positions"] == "prompt"]
    np.testing.assert_allclose(prompt["metric"], 0.0, atol=1e-5)


def test_colour_patching_localises_to_image_early_and_last_position_late(model, resid_table):
    table = resid_table.pivot(index="positions", columns="layer", values="metric")
    last_layer = model.n_layers - 1
    assert table.loc["image", 0] > 0.9 and table.loc["image", 1] > 0.9
    assert table.loc["last", last_layer] > 0.8
    assert table.loc["last", 0] < 0.05 and table.loc["image", last_layer] < 0.3
    assert table.loc["prompt"].abs().max() < 0.05


def test_per_head_sites_and_per_example_rows(model, pair):
    clean, corrupted, answers = pair
    table = patch(model, clean, corrupted, "blocks.*.attn.hook_z", positions="last", answers=answers)
    assert len(table) == model.n_layers * model.n_heads
    assert set(table["head"]) == set(range(model.n_heads))
    # patching every head's z at one layer is patching that layer's attention output
    whole = patch(model, clean, corrupted, ["blocks.2.hook_attn_out"], positions="last", answers=answers)
    with model.capture("blocks.2.attn.hook_z") as cache:
        model.forward(clean)
    with editing(model, {"blocks.2.attn.hook_z": lambda z: torch.cat([z[:, :-1], cache["blocks.2.attn.hook_z"][:, -1:]], 1)}):
        logits = last_logits(model, corrupted)
    ids = model.answer_token_ids(corrupted, [list(a) for a in zip(*answers)])
    value = (logits.gather(1, ids[:, :1]) - logits.gather(1, ids[:, 1:])).mean()
    assert whole["value"].item() == pytest.approx(float(value), abs=1e-4)

    def one_head(z):  # head 2 of layer 2 at the last position only
        z = z.clone()
        z[:, -1, 2] = cache["blocks.2.attn.hook_z"][:, -1, 2]
        return z
    with editing(model, {"blocks.2.attn.hook_z": one_head}):
        logits = last_logits(model, corrupted)
    row = table[(table["layer"] == 2) & (table["head"] == 2)]
    value = (logits.gather(1, ids[:, :1]) - logits.gather(1, ids[:, 1:])).mean()
    assert row["value"].item() == pytest.approx(float(value), abs=1e-4)
    per = patch(model, clean, corrupted, "blocks.3.hook_resid_pre", positions="last", answers=answers,
                per_example=True)
    assert len(per) == len(clean) and set(per["example"]) == set(range(len(clean)))
    mean = patch(model, clean, corrupted, "blocks.3.hook_resid_pre", positions="last", answers=answers)
    assert per["value"].mean() == pytest.approx(mean["value"].item(), abs=1e-5)


def test_heatmap_has_one_cell_per_site(model, resid_table, pair):
    fig = lp.circuits.heatmap(resid_table)
    data = fig.axes[0].images[0].get_array()
    assert data.shape == (4, model.n_layers)
    assert np.nanmax(data) == pytest.approx(1.0, abs=1e-5)


# --- errors and hooks ---------------------------------------------------------------------------
def test_pairs_with_different_layouts_raise(model, pair):
    clean, _, _ = pair
    world = lp.worlds.ShapesWorld(seed=3, image_size=64)
    questions = world.questions(len(clean), level="relation")
    other = model.prepare(images=[q.image for q in questions], prompts=[q.prompt for q in questions])
    with pytest.raises(InputError, match="equal token layouts|different text tokens"):
        check_pair(clean, other)
    with pytest.raises(InputError, match="clean has 8 examples but corrupted has 2"):
        check_pair(clean, model.prepare(images=[q.image for q in questions[:2]],
                                        prompts=[q.prompt for q in questions[:2]]))
    a, b = world.pairs(2, change="color")
    with pytest.raises(InputError, match="different prompts"):
        pair_batches(model, [(a[0], b[1])])


def test_bad_input_names_what_was_received(model, pair):
    clean, corrupted, answers = pair
    with pytest.raises(InputError, match="cannot write 'blocks.0.attn.hook_result'.*hook_z"):
        patch(model, clean, corrupted, "blocks.0.attn.hook_result")
    with pytest.raises(InputError, match="cannot write 'blocks.0.hook_resid_mid'"):
        patch(model, clean, corrupted, "blocks.0.hook_resid_mid")
    with pytest.raises(InputError, match="not in it"):
        patch(model, clean, corrupted, "vision.blocks.0.hook_resid_post")
    with pytest.raises(HookNameError, match="unknown hook"):
        patch(model, clean, corrupted, "blocks.0.hook_resid_pree")
    with pytest.raises(InputError, match="unknown metric 'kl'"):
        patch(model, clean, corrupted, "blocks.0.hook_resid_pre", metric="kl", answers=answers)
    with pytest.raises(InputError, match="same token"):
        patch(model, clean, corrupted, "blocks.0.hook_resid_pre", answers=(answers[0], answers[0]))
    with pytest.raises(InputError, match="nothing to restore"):
        patch(model, clean, clean, "blocks.0.hook_resid_pre", answers=answers)
    with pytest.raises(InputError, match="sender must be"):
        path_patch(model, clean, corrupted, senders=[(9, 0)], answers=answers)
    with pytest.raises(InputError, match="receiver must be"):
        path_patch(model, clean, corrupted, senders=(0, 0), receivers=[(1, 0, "z")], answers=answers)


def test_hooks_are_removed_when_a_run_raises(model, pair):
    clean, corrupted, answers = pair
    before = hook_counts(model)

    def broken(logits):
        raise RuntimeError("metric failed")
    with pytest.raises(RuntimeError, match="metric failed"):
        patch(model, clean, corrupted, "blocks.*.hook_resid_pre", metric=broken)
    assert hook_counts(model) == before
    with pytest.raises(LVLMProbeError, match="returned \\(2,\\)"):
        with editing(model, {"blocks.1.attn.hook_z": lambda z: torch.zeros(2)}):
            model.forward(corrupted)
    assert hook_counts(model) == before
    with pytest.raises(KeyError):
        with editing(model, {"blocks.1.hook_mlp_out": lambda x: x}):
            assert hook_counts(model) == before + 1
            raise KeyError("user code")
    assert hook_counts(model) == before
    assert lp.hooks.attention.active() == (0, 0)


# --- path patching ------------------------------------------------------------------------------
def test_path_to_the_logits_equals_adding_the_senders_write_to_the_final_residual(model, pair):
    clean, corrupted, answers = pair
    senders = [(1, 3), (2, 2), (3, 0)]
    table = path_patch(model, clean, corrupted, senders=senders, answers=answers)
    L = model.n_layers
    names = ["blocks.*.attn.hook_result", f"blocks.{L - 1}.hook_resid_post"]
    with model.capture(names, positions="last", reduce="last") as c_cache:
        model.forward(clean)
    with model.capture(names, positions="last", reduce="last") as x_cache:
        model.forward(corrupted)
    ids = model.answer_token_ids(corrupted, [list(a) for a in zip(*answers)])
    for (layer, head), value in zip(senders, table["value"]):
        name = f"blocks.{layer}.attn.hook_result"
        delta = c_cache[name][:, head] - x_cache[name][:, head]  # [b, d_model]
        logits = unembed(model, x_cache[f"blocks.{L - 1}.hook_resid_post"] + delta)
        expected = (logits.gather(1, ids[:, :1]) - logits.gather(1, ids[:, 1:])).mean()
        assert value == pytest.approx(float(expected), abs=1e-4)


def test_path_to_a_receiver_value_recomputes_only_that_input(model, pair):
    clean, corrupted, answers = pair
    (layer, head), receiver = (1, 3), (2, 2)
    table = path_patch(model, clean, corrupted, senders=[(layer, head), (3, 1)],
                       receivers=[(*receiver, "v")], answers=answers)
    with model.capture(f"blocks.{layer}.attn.hook_z") as c_cache:
        model.forward(clean)
    with model.capture([f"blocks.{layer}.attn.hook_z", f"blocks.{receiver[0]}.hook_resid_pre"]) as x_cache:
        corrupted_logits = last_logits(model, corrupted)
    dz = (c_cache[f"blocks.{layer}.attn.hook_z"] - x_cache[f"blocks.{layer}.attn.hook_z"])[:, :, head]
    o_proj = model.module(f"{model.family.lm_layers}.{layer}.{model.family.lm_attn_out}")
    delta = einsum(dz, rearrange(o_proj.weight, "m (h d) -> h d m", h=model.n_heads)[head], "b p d, d m -> b p m")
    block = model.module(f"{model.family.lm_layers}.{receiver[0]}")
    with torch.no_grad():
        v = block.self_attn.v_proj(block.input_layernorm(x_cache[f"blocks.{receiver[0]}.hook_resid_pre"] + delta))
    v = rearrange(v, "b p (h d) -> b p h d", h=model.n_kv_heads)

    def take(value):
        value = value.clone()
        value[:, :, receiver[1]] = v[:, :, receiver[1]]
        return value
    with editing(model, {f"blocks.{receiver[0]}.attn.hook_v": take}):
        logits = last_logits(model, corrupted)
    ids = model.answer_token_ids(corrupted, [list(a) for a in zip(*answers)])

    def diff(x):
        return float((x.gather(1, ids[:, :1]) - x.gather(1, ids[:, 1:])).mean())
    assert table["value"].iloc[0] == pytest.approx(diff(logits), abs=1e-4)
    # a sender after the receiver has no path to it: the corrupted run exactly
    assert table["value"].iloc[1] == pytest.approx(diff(corrupted_logits), abs=1e-5)
    assert table["metric"].iloc[1] == pytest.approx(0.0, abs=1e-5)


@pytest.fixture(scope="module")
def direct_paths(model, pair):
    clean, corrupted, answers = pair
    return path_patch(model, clean, corrupted, answers=answers)


def test_direct_paths_find_the_heads_that_carry_colour(model, direct_paths):
    assert len(direct_paths) == model.n_layers * model.n_heads
    top = direct_paths.sort_values("metric", ascending=False).head(3)
    assert top["layer"].min() >= 1  # colour reaches the answer after the image was read


def test_three_direct_paths_carry_much_of_the_answer(direct_paths):
    assert direct_paths.sort_values("metric", ascending=False).head(3)["metric"].sum() > 0.4


# --- head attribution ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def colour_questions():
    return lp.worlds.ShapesWorld(seed=1000, image_size=64).questions(32, level="attribute", kind="color")


def test_head_attribution_is_ranked_and_adds_up_to_dla(model, colour_questions):
    table = head_attribution(model, colour_questions, batch_size=16)
    assert list(table["rank"]) == list(range(1, model.n_layers * model.n_heads + 1))
    assert table["score"].is_monotonic_decreasing
    assert (table["image_attention"].between(0, 1 + 1e-6)).all()
    batch = model.prepare(images=[q.image for q in colour_questions], prompts=[q.prompt for q in colour_questions])
    by_source = lp.attribution.dla(model, batch, [q.answer for q in colour_questions]).by_source()
    assert table["image_effect"].sum() == pytest.approx(by_source["image"].mean(), abs=1e-3)
    with pytest.raises(InputError, match="pass target="):
        head_attribution(model, batch)


# Measured on the shipped shapes-llava: with the reads into the answer position zeroed, the
# answer's mean log-probability is -0.28 for the top three heads by image attention x direct effect
# and -0.53 on average for three random heads. A likely reason: the heads that gather the asked
# object into the answer position (by layer 2, as the training's answer-position heads ask) act
# through the later layers, which a direct-effect ranking does not see.
@pytest.mark.xfail(strict=True, reason="shapes-llava: knocking out the top-ranked heads costs less than random ones")
def test_knocking_out_the_top_heads_hurts_more_than_random_heads(model, colour_questions):
    table = head_attribution(model, colour_questions)
    batch = model.prepare(images=[q.image for q in colour_questions], prompts=[q.prompt for q in colour_questions])
    answers = model.answer_token_ids(batch, [[q.answer] for q in colour_questions])[:, 0]

    def logprob_without(heads):
        edits = {}
        for layer in {la for la, _ in heads}:
            chosen = [h for la, h in heads if la == layer]

            def zero(z, chosen=chosen):
                z = z.clone()
                z[:, -1, chosen] = 0  # the heads' reads into the answer position
                return z
            edits[f"blocks.{layer}.attn.hook_z"] = zero
        with editing(model, edits):
            logits = last_logits(model, batch)
        return float(torch.log_softmax(logits, -1).gather(1, answers[:, None]).mean())

    top = [tuple(map(int, r)) for r in table[["layer", "head"]].head(3).to_numpy()]
    everyone = [(la, h) for la in range(model.n_layers) for h in range(model.n_heads)]
    generator = torch.Generator().manual_seed(0)
    random = [logprob_without([everyone[j] for j in torch.randperm(len(everyone), generator=generator)[:3]])
              for _ in range(12)]
    knocked = logprob_without(top)
    assert knocked < np.mean(random) - 0.1
    assert np.mean([knocked < r for r in random]) >= 0.8
