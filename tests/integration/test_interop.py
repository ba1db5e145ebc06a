"""TransformerLens bridge and nnsight over a model's own weights: their values equal model.capture,
the wrapped HF model is left alone, and nothing installs packages."""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from conftest import random_image

import lvlm_probe as lp
import lvlm_probe.interop as interop
from lvlm_probe.errors import HookNameError, InputError, LVLMProbeError, UnsupportedModelError
from lvlm_probe.hooks.names import hook_points

PROMPTS = ["Is there a heart?", "Is there a red heart left of the blue star? Answer yes or no."]
BRIDGE_NAMES = ["blocks.*.hook_resid_post", "blocks.*.hook_resid_pre", "blocks.*.hook_attn_out",
                "blocks.*.hook_mlp_out", "blocks.*.attn.hook_z", "ln_final.hook_normalized"]
BRIDGE_MODELS = [*interop.bridge_families(), "shapes-llava"]
NO_BRIDGE = sorted(set(lp.families.names()) - set(interop.bridge_families()))
# Names the installed TransformerLens's adapter for a family does not offer (checked to be absent,
# so the entry goes when TransformerLens adds them): its Gemma 4 adapter wraps the final norm as a
# plain component, without hook_normalized.
BRIDGE_LACKS = {"gemma4": {"ln_final.hook_normalized"}}


def _bridged_names(model, names):
    """``names`` without the ones the family's bridge lacks, after checking they are absent."""
    lacks = BRIDGE_LACKS.get(model.family.name, set())
    return [n for n in names if n not in lacks], lacks


def load(name: str) -> lp.LVLM:
    return lp.zoo.load(name, device="cpu") if name == "shapes-llava" else lp.zoo.tiny(name, device="cpu")


def padded_batch(model: lp.LVLM) -> lp.Batch:
    """Two examples of different prompt lengths and image sizes, so the first is left-padded."""
    return model.prepare(images=[[random_image(40, 56, 1)], [random_image(72, 48, 2)]], prompts=PROMPTS)


def environment() -> set[tuple[str, str]]:
    return {(d.metadata["Name"], d.version) for d in importlib.metadata.distributions()}


@pytest.fixture(scope="module", params=BRIDGE_MODELS)
def bridged(request):
    model = load(request.param)
    return model, interop.transformer_bridge(model), padded_batch(model)


# --- TransformerLens bridge -------------------------------------------------------------------

def test_bridge_cache_equals_capture(bridged):
    """Acceptance: the captured LM tensors equal the bridge's cache of the same quantity to 1e-4,
    and so do the logits (at real positions: padding rows differ between eager and SDPA)."""
    model, bridge, batch = bridged
    names, lacks = _bridged_names(model, BRIDGE_NAMES)
    if lacks:
        assert set(interop.bridge_names(model, bridge, sorted(lacks)).values()) == {None}
    mapping = interop.bridge_names(model, bridge, names)
    assert None not in mapping.values(), mapping
    wanted = set(mapping.values())
    with torch.no_grad():
        with model.capture(BRIDGE_NAMES) as cache:
            expected = model.forward(batch).logits
        logits, bridge_cache = bridge.run_with_cache(**interop.bridge_inputs(batch),
                                                     names_filter=lambda n: n in wanted)
    real = batch.inputs["attention_mask"].bool()
    assert not real.all()  # the batch does hold padding
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=0)
    for ours, theirs in mapping.items():
        assert cache[ours].shape == bridge_cache[theirs].shape, ours
        torch.testing.assert_close(cache[ours][real], bridge_cache[theirs][real], atol=1e-4, rtol=0,
                                   msg=lambda m, ours=ours: f"{ours}: {m}")


def test_bridge_same_names_equal_capture(bridged):
    """Language-model names mean the same in both, so a TransformerLens names filter works on our
    cache unchanged."""
    model, bridge, batch = bridged
    names = ["blocks.*.hook_resid_pre", "blocks.*.hook_resid_mid", "blocks.*.hook_resid_post",
             "blocks.*.attn.hook_z", "blocks.*.attn.hook_q", "blocks.*.attn.hook_k",
             "blocks.*.attn.hook_v", "hook_embed", "blocks.*.hook_attn_out", "blocks.*.hook_mlp_out",
             "ln_final.hook_normalized", "ln_final.hook_out"]
    names, lacks = _bridged_names(model, names)
    if model.family.lm_q_gate:  # q_proj emits query and gate: no hook_q here (the bridge splits
        names.remove("blocks.*.attn.hook_q")  # it as twice the heads, gate included)
    with torch.no_grad():
        with model.capture(names) as cache:
            model.forward(batch)
        _, bridge_cache = bridge.run_with_cache(**interop.bridge_inputs(batch),
                                                names_filter=lambda n: n in cache)
    real = batch.inputs["attention_mask"].bool()
    # layers that mix tokens without attention write under another name there (see bridge_names)
    unmasked = {f"blocks.{layer}.hook_attn_out" for layer in model.family.unmasked_mixing_layers(model.config)}
    # where keys double as values (Gemma 4's attention_k_eq_v) there is no value projection, where
    # the bridge hooks hook_v; ours is the value norm's input there (checked to be absent there)
    points = hook_points(model)
    keys_as_values = {n for n in cache.names() if n.endswith(".attn.hook_v") and points[n].kind == "input"}
    assert set(cache.names()) - unmasked - keys_as_values <= set(bridge_cache.keys())
    assert not (lacks | keys_as_values) & set(bridge.hook_dict)
    for name in set(cache.names()) - unmasked - keys_as_values:
        torch.testing.assert_close(cache[name][real], bridge_cache[name][real], atol=1e-4, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_bridge_agrees_where_trained_weights_matter():
    """Names whose value depends on a norm's learned weight agree with the bridge's on the trained
    model (a tiny model's norm weights are all one, which would hide a difference), and Gemma 3's
    attn/mlp outputs are the writes after its sandwich norms, as the bridge's are."""
    model = lp.zoo.load("shapes-llava", device="cpu")
    bridge = interop.transformer_bridge(model)
    batch = model.prepare(images=[random_image(64, 64, 3)], prompts=["Is there a red heart?"])
    names = ["ln_final.hook_normalized", "ln_final.hook_out"]
    with torch.no_grad():
        with model.capture(names) as cache:
            model.forward(batch)
        _, theirs = bridge.run_with_cache(**interop.bridge_inputs(batch), names_filter=names)
    assert not torch.allclose(cache[names[0]], cache[names[1]], atol=1e-2)  # the weight matters
    for name in names:
        torch.testing.assert_close(cache[name], theirs[name], atol=1e-4, rtol=0)

    model = lp.zoo.tiny("gemma3", device="cpu")
    bridge = interop.transformer_bridge(model)
    batch = model.prepare(images=[random_image(40, 56, 1)], prompts=["Is there a heart?"])
    names = ["blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"]
    with torch.no_grad():
        with model.capture(names) as cache:
            model.forward(batch)
        _, theirs = bridge.run_with_cache(**interop.bridge_inputs(batch), names_filter=names)
    for name in names:
        torch.testing.assert_close(cache[name], theirs[name], atol=1e-4, rtol=0)


def test_bridge_vision_and_projector_names(bridged):
    model, bridge, batch = bridged
    names = ["vision.blocks.*.hook_resid_post", "projector.hook_out"]
    mapping = interop.bridge_names(model, bridge, names)
    assert mapping["projector.hook_out"] is not None, mapping
    # TransformerLens bridges some vision towers as one opaque block (Mistral 3's Pixtral tower has
    # only vision_encoder.hook_in/out): only a bridge without per-block vision hooks may leave our
    # vision block names unmapped
    per_block = any(re.fullmatch(r"vision_encoder\.\w+\.\d+\.hook_out", key) for key in bridge.hook_dict)
    vision = [name for ours, name in mapping.items() if ours.startswith("vision.")]
    assert all(name is not None for name in vision) if per_block else all(name is None for name in vision), mapping
    mapping = {ours: name for ours, name in mapping.items() if name is not None}
    with torch.no_grad():
        with model.capture(names) as cache:
            model.forward(batch)
        _, theirs = bridge.run_with_cache(**interop.bridge_inputs(batch),
                                          names_filter=list(mapping.values()))
    for ours, name in mapping.items():
        torch.testing.assert_close(cache[ours], theirs[name], atol=1e-4, rtol=0)


def test_bridge_shares_weights_and_leaves_model_alone():
    model = lp.zoo.tiny("llava", device="cpu")
    batch = padded_batch(model)
    before = model.forward(batch).logits
    modules = [(name, type(m)) for name, m in model.hf.named_modules()]
    attn = model.hf.config._attn_implementation
    padding = model.tokenizer.padding_side, len(model.tokenizer)

    bridge = interop.transformer_bridge(model)
    assert bridge.processor is model.processor
    shared = list(bridge.original_model.parameters())
    assert all(a is b for a, b in zip(shared, model.hf.parameters()))
    assert bridge.original_model is not model.hf
    # the bridge replaced its twin's layers with its wrappers, not the model's
    assert [(name, type(m)) for name, m in model.hf.named_modules()] == modules
    assert model.hf.config._attn_implementation == attn
    assert (model.tokenizer.padding_side, len(model.tokenizer)) == padding
    assert torch.equal(model.forward(batch).logits, before)
    # model.capture still finds every declared path and still equals the bridge
    with model.capture("blocks.*.hook_resid_post") as cache:
        model.forward(batch)
    assert len(cache.names()) == model.n_layers

    copied = interop.transformer_bridge(model, share_weights=False)
    ptrs = {p.data_ptr() for p in model.hf.parameters()}
    assert not ptrs & {p.data_ptr() for p in copied.original_model.parameters()}


def test_bridge_and_nnsight_made_inside_a_capture_record_nothing_into_it():
    """The twins do not inherit an active capture's hooks, so their runs stay out of its cache."""
    model = lp.zoo.tiny("llava", device="cpu")
    batch = padded_batch(model)
    names = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_pattern"]
    with torch.no_grad(), model.capture(names) as cache:
        bridge = interop.transformer_bridge(model)
        nn_model = interop.nnsight(model)
        bridge(**interop.bridge_inputs(batch))
        with nn_model.trace(**batch.inputs):
            nn_model.output.save()
        assert cache.names() == []
        model.forward(batch)
    assert len(cache.names()) == model.n_layers + 1
    assert all(len(cache.calls(name)) == 1 for name in cache.names())


@pytest.mark.parametrize("family", NO_BRIDGE)
def test_bridge_unsupported_family(family):
    model = lp.zoo.tiny(family, device="cpu")
    with pytest.raises(UnsupportedModelError) as info:
        interop.transformer_bridge(model)
    message = str(info.value)
    assert repr(family) in message and type(model.hf).__name__ in message
    assert all(name in message for name in interop.bridge_families())


def test_bridge_families_match_transformer_lens():
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    registry = lp.families.registry()
    expected = sorted(n for n, f in registry.items() if set(f.hf_classes) & set(SUPPORTED_ARCHITECTURES))
    assert interop.bridge_families() == expected
    assert {"llava", "qwen2_5_vl"} <= set(expected)


# --- no package installs ----------------------------------------------------------------------

def test_building_bridges_leaves_environment_unchanged():
    before = environment()
    for family in interop.bridge_families():
        interop.transformer_bridge(lp.zoo.tiny(family, device="cpu"))
    assert environment() == before


@pytest.fixture
def inert_installers(monkeypatch):
    """Belt and braces for the tests below: should the guard ever fail, pip and uv run offline
    without an index and as a dry run, so nothing could be installed."""
    for key, value in {"PIP_NO_INDEX": "1", "PIP_DRY_RUN": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                       "UV_OFFLINE": "1", "UV_NO_INDEX": "1"}.items():
        monkeypatch.setenv(key, value)


def test_transformer_lens_torchvision_install_is_refused(monkeypatch, tmp_path, inert_installers):
    """TransformerLens's loader, when a processor fails to load and torchvision is missing, runs
    `pip install torchvision`; under the guard the installer never starts and the block raises."""
    from transformer_lens.model_bridge.sources.transformers import helpers

    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now fails
    holder = types.SimpleNamespace(processor=None)
    cfg = types.SimpleNamespace(is_multimodal=True)
    before = environment()
    with pytest.raises(interop.PackageInstallError) as info:
        with interop.no_installs():
            # the boot_transformers path: processor load fails -> _ensure_torchvision -> installer
            helpers.load_modality_processor(holder, cfg, str(tmp_path / "absent"), False, None)
    message = str(info.value)
    assert "torchvision" in message and "install" in message and "pip install" in message
    assert isinstance(info.value, LVLMProbeError)
    assert environment() == before
    assert holder.processor is None


def test_no_installs_refuses_installers_and_allows_other_commands(inert_installers):
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "lvlm-probe-absent-package"]
    with pytest.raises(interop.PackageInstallError, match="pip install"):
        with interop.no_installs():
            subprocess.run(pip, check=False, capture_output=True)
    with pytest.raises(interop.PackageInstallError):
        with interop.no_installs():
            os.system("pip install --no-index lvlm-probe-absent-package")
    with pytest.raises(interop.PackageInstallError):
        with interop.no_installs():
            subprocess.run("pip install --no-index lvlm-probe-absent-package", shell=True, check=False)
    with interop.no_installs():  # other commands run, and the block ends quietly
        done = subprocess.run([sys.executable, "-c", "print('ok')"], capture_output=True, text=True)
    assert done.stdout.strip() == "ok"
    # outside the block installers are not our business: only check the hook is inert
    assert interop.installer_command(pip) is not None


@pytest.mark.parametrize(("command", "installs"), [
    (["python", "-m", "pip", "install", "torchvision"], True),
    (["uv", "pip", "install", "torchvision", "-q"], True),
    (["/usr/bin/pip3.11", "install", "x"], True),
    (["conda", "install", "-y", "pytorch"], True),
    (["/bin/sh", "-c", "pip install x"], True),
    ("uv add torch", True),
    (["python", "-m", "pip", "list"], False),
    (["git", "status"], False),
    ("ls -l", False),
])
def test_installer_command(command, installs):
    assert (interop.installer_command(command) is not None) == installs


# --- nnsight ----------------------------------------------------------------------------------

NNSIGHT_FAMILIES = lp.families.names() + lp.zoo.tiny_generic()  # and the generic adapter


def _module_names(model):
    """Every name that is a module's input or output (patterns and scores are not)."""
    return [n for n, p in hook_points(model).items() if p.kind in ("output", "input")]


@pytest.mark.parametrize("family", NNSIGHT_FAMILIES)
def test_nnsight_values_equal_capture(family):
    model = lp.zoo.tiny(family, device="cpu")
    batch = padded_batch(model)
    names = _module_names(model)
    nn_model = interop.nnsight(model)
    with torch.no_grad():
        with model.capture(names) as cache:
            expected = model.forward(batch).logits
        with nn_model.trace(**batch.inputs) as tracer:
            values = interop.nnsight_save(tracer, model, names)
            logits = nn_model.output.logits.save()
    assert torch.equal(logits, expected)
    assert list(values) == names
    for name in names:
        assert values[name].shape == cache[name].shape, name
        torch.testing.assert_close(values[name], cache[name], atol=1e-6, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_nnsight_paths():
    model = lp.zoo.tiny("llava", device="cpu")
    paths = interop.nnsight_paths(model, ["blocks.1.attn.hook_z", "blocks.*.hook_resid_post"])
    fam = model.family
    assert paths["blocks.1.attn.hook_z"] == (f"{fam.lm_layers}.1.{fam.lm_attn_out}", "input", "heads")
    assert paths["blocks.0.hook_resid_post"] == interop.NNsightPath(f"{fam.lm_layers}.0", "output", None)
    nn_model = interop.nnsight(model)
    for path, _, _ in paths.values():
        nn_model.get(path)  # every path resolves in the nnsight tree
    with pytest.raises(InputError, match="hook_pattern"):
        interop.nnsight_paths(model, "blocks.0.attn.hook_pattern")
    with pytest.raises(HookNameError, match="hook_resid_pots"):
        interop.nnsight_paths(model, "blocks.0.hook_resid_pots")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "blip2"])
def test_nnsight_intervention_zeroing_one_head(family):
    """Zeroing one head's z at one layer changes the logits and nothing before that layer;
    a trace that edits nothing gives logits bitwise equal to model.forward."""
    model = lp.zoo.tiny(family, device="cpu")
    batch = padded_batch(model)
    layer, head = model.n_layers - 1, 1
    z_name = f"blocks.{layer}.attn.hook_z"
    path, kind, _ = interop.nnsight_paths(model, z_name)[z_name]
    assert kind == "input"
    nn_model = interop.nnsight(model)
    with torch.no_grad():
        clean = model.forward(batch).logits
        with nn_model.trace(**batch.inputs):
            untouched = nn_model.output.logits.save()
        with nn_model.trace(**batch.inputs) as tracer:
            values = interop.nnsight_save(tracer, model, [z_name, f"blocks.{layer - 1}.hook_resid_post"])
            z = nn_model.get(path).input
            d = model.d_head
            z = z.clone()
            z[..., head * d:(head + 1) * d] = 0
            nn_model.get(path).input = z
            edited = nn_model.output.logits.save()
    assert torch.equal(untouched, clean)
    assert not torch.allclose(edited, clean, atol=1e-6)
    assert torch.all(values[z_name][:, :, head] == 0)  # values are recorded after the edit
    assert values[z_name][:, :, head - 1].abs().sum() > 0
    with torch.no_grad(), model.capture(f"blocks.{layer - 1}.hook_resid_post") as cache:
        model.forward(batch)
    assert torch.equal(values[f"blocks.{layer - 1}.hook_resid_post"],
                       cache[f"blocks.{layer - 1}.hook_resid_post"])


def test_nnsight_shares_weights_and_leaves_model_alone():
    model = lp.zoo.tiny("llava", device="cpu")
    nn_model = interop.nnsight(model)
    traced = nn_model.get(model.family.lm_layers)._module
    assert traced is not model.module(model.family.lm_layers)
    assert all(a is b for a, b in zip(nn_model._module.parameters(), model.hf.parameters()))
    # nnsight installs its controller as each wrapped module's forward; not on model.hf
    assert not any("forward" in m.__dict__ for m in model.hf.modules())
    with pytest.raises(LVLMProbeError, match="did not run"):
        with torch.no_grad(), nn_model.trace(**padded_batch(model).inputs) as tracer:
            values = interop.nnsight_save(tracer, model, "blocks.0.hook_resid_post")
            tracer.stop()
        values["blocks.0.hook_resid_post"]
