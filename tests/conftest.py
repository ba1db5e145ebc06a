"""Test settings: everything offline, tiny models built into a per-session cache."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
from PIL import Image

import lvlm_probe as lp

PROMPTS = ["Is there a heart?", "Is there a red heart left of the blue star? Answer yes or no."]


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory):
    """Build tiny models into a fresh cache, so tests never read a stale or foreign one."""
    if "LVLM_PROBE_CACHE" not in os.environ:
        os.environ["LVLM_PROBE_CACHE"] = str(tmp_path_factory.mktemp("lvlm_probe_cache"))
    yield


def store_files(root) -> dict[str, bytes]:
    """Every file of a store but its lock, by relative path (to compare two stores byte for byte)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def images():
    """Two images of different sizes and aspect ratios (so dynamic-resolution grids differ)."""
    return [random_image(40, 56, seed=1), random_image(72, 48, seed=2)]


@pytest.fixture(scope="module", params=lp.families.names())
def tiny_batch(request):
    """Every family's tiny model with a padded two-example batch (different prompt lengths and
    image sizes)."""
    model = lp.zoo.tiny(request.param, device="cpu")
    images = [[random_image(40, 56, seed=1)], [random_image(72, 48, seed=2)]]
    return model, model.prepare(images=images, prompts=PROMPTS)
