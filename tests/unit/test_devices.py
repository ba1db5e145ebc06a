"""The one resolver of device= and dtype= arguments."""
from __future__ import annotations

import pytest
import torch

from lvlm_probe.devices import resolve_device, resolve_dtype
from lvlm_probe.errors import InputError


@pytest.mark.parametrize("spelling", ["bfloat16", "bf16", "torch.bfloat16", torch.bfloat16])
def test_every_spelling_of_a_dtype_resolves_to_it(spelling):
    assert resolve_dtype(spelling) is torch.bfloat16


def test_none_is_the_default_dtype():
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype(None, default=torch.float16) is torch.float16


def test_dtype_errors_say_what_was_received_and_what_is_accepted():
    with pytest.raises(InputError, match=r"unknown dtype 'float13'; expected a torch.dtype or one of \[.*'bf16'"):
        resolve_dtype("float13")
    allowed = (torch.float32, torch.float64)
    assert resolve_dtype("double", allowed=allowed) is torch.float64
    with pytest.raises(InputError, match=r"dtype torch.float16 is not supported here; expected one of "
                                         r"\['double', 'float', 'float32', 'float64', 'fp32', 'fp64'\]"):
        resolve_dtype(torch.float16, allowed=allowed)


def test_devices_resolve_with_their_default():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None, default="cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_names_the_value():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(InputError, match=rf"device '{name}' needs CUDA, which this machine does not have"):
            resolve_device(name)
