"""The explorer widget on shapes-llava: builds, follows its controls without running the model, and
its per-token attribution adds up to the heads' direct logit attribution."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lvlm_probe as lp
from lvlm_probe.circuits.snapshot import snapshot
from lvlm_probe.errors import InputError


@pytest.fixture(scope="module")
def model():
    return lp.zoo.load("shapes-llava", device="cpu")


@pytest.fixture(scope="module")
def questions():
    return lp.worlds.ShapesWorld(seed=0, image_size=64).questions(2, level="attribute", kind="color")


@pytest.fixture(scope="module")
def batch(model, questions):
    return model.prepare(images=[q.image for q in questions], prompts=[q.prompt for q in questions])


@pytest.fixture(scope="module")
def explorer(model, batch, questions):
    return lp.widgets.explore(model, batch, example=1, target=questions[1].answer)


class ForwardCounter:
    """Counts the HF model's forward calls while active."""

    def __init__(self, model):
        self.calls, self.model = 0, model

    def __enter__(self):
        self.handle = self.model.hf.register_forward_pre_hook(self._count)
        return self

    def _count(self, module, args):
        self.calls += 1

    def __exit__(self, *exc):
        self.handle.remove()


def test_controls_change_the_figure_without_running_the_model(model, explorer):
    with ForwardCounter(model) as counter:
        seen = [bytes(explorer.image.value)]
        shown = [explorer.shown()]
        for control, value in ((explorer.layer, 1), (explorer.head, 3), (explorer.position, 30),
                               (explorer.mode, "logit lens"), (explorer.layer, 2)):
            control.value = value
            seen.append(bytes(explorer.image.value))
            shown.append(explorer.shown())
    assert counter.calls == 0
    assert all(a != b for a, b in zip(seen, seen[1:])), "a control change left the rendered PNG unchanged"
    assert seen[0].startswith(b"\x89PNG")
    # the image panel follows layer, head and query: attention cells differ between those states
    cells = [s["cells"] for s in shown[:4]]
    assert all(c.shape == (4, 4) for c in cells)
    assert not np.allclose(cells[0], cells[1]) and not np.allclose(cells[1], cells[2])
    assert shown[4]["lens"].shape == (4, 4) and shown[4]["lens"].dtype.kind == "U"
    assert np.all((shown[4]["cells"] >= 0) & (shown[4]["cells"] <= 1))
    # the query picker bounds the shown tokens: no token after the query position
    assert len(shown[3]["tokens"]) < len(shown[2]["tokens"])


def test_attention_cells_are_the_heads_attention_to_the_image(model, batch, explorer):
    snap = explorer.snapshot
    explorer.mode.value = "attention"
    explorer.layer.value, explorer.head.value = 2, 1
    explorer.position.value = len(snap.tokens) - 1
    single = model.prepare(images=batch.images[1], prompts=batch.prompts[1])
    with model.capture("blocks.2.attn.hook_pattern", positions="last", reduce="last") as cache:
        model.forward(single)
    image = single.layouts[0].images[0].grid.positions
    expected = cache["blocks.2.attn.hook_pattern"][0, 1][image].numpy()
    np.testing.assert_allclose(explorer.shown()["cells"], expected, atol=1e-6)


def test_token_attribution_adds_up_to_the_heads_direct_logit_attribution(model, batch, questions):
    snap = snapshot(model, batch, example=1, target=questions[1].answer, foil="red", split=False)
    single = model.prepare(images=batch.images[1], prompts=batch.prompts[1])
    terms = lp.attribution.dla(model, single, questions[1].answer, foil="red").terms
    heads = terms[terms["component"] == "head"].groupby(["layer", "head"])["value"].sum()
    last = len(snap.tokens) - 1
    ours = torch.stack([torch.stack([snap.contributions(la, h, last).sum() for h in range(model.n_heads)])
                        for la in range(model.n_layers)])
    np.testing.assert_allclose(ours.numpy().ravel(), heads.to_numpy(), atol=1e-4)
    assert snap.foil == " red" and snap.split is None


def test_source_split_panel_is_exact(explorer):
    split = explorer.shown()["split"]
    assert split["prior"] + split["prompt"] + split["image"] == pytest.approx(split["full"], abs=1e-4)


def test_bad_input(model, batch):
    with pytest.raises(InputError, match=r"example must be an index in \[0, 2\), got 5"):
        lp.widgets.explore(model, batch, example=5)
    with pytest.raises(InputError, match="batch must be a Batch from model.prepare, got list"):
        lp.widgets.explore(model, [batch])
    with pytest.raises(InputError, match="target"):
        lp.widgets.explore(model, batch, target="a very long answer")
