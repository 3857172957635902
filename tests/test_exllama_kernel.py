"""The exllama kernel's registration: honest capabilities, and a reason (never a crash) where it cannot run.

Its numerics are checked on the GPU (tests/gpu/test_kernels_gpu.py); CI has no CUDA and no exllamav2.
"""

import importlib.util

import pytest
import torch
from tiny_checkpoints import build

from gptq_bridge import load_model
from gptq_bridge.config import QuantizeConfig
from gptq_bridge.errors import KernelError
from gptq_bridge.kernels import exllama
from gptq_bridge.plugins import registered_kernels
from gptq_bridge.selection import select_kernel
from gptq_bridge.types import DeviceInfo, LayerShape

H100 = DeviceInfo(type="cuda", index=0, capability=(9, 0), name="H100")


def test_registered_as_a_builtin_with_its_capabilities():
    spec = next(k for k in registered_kernels() if k.name == "exllama")
    assert spec.bits == frozenset({4}) and spec.devices == frozenset({"cuda"})
    assert spec.dtypes == frozenset({torch.float16}) and spec.act_order and spec.asymmetric


@pytest.mark.skipif(
    torch.cuda.is_available() and importlib.util.find_spec("exllamav2") is not None,
    reason="exllamav2 and CUDA are here: the GPU tests cover it",
)
def test_unavailable_gives_the_reason():
    reason = exllama.kernel_spec().check_available()
    if importlib.util.find_spec("exllamav2") is None:
        assert reason == "the exllamav2 package is not installed (pip install 'gptq-bridge[exllama]')"
    else:
        assert reason == "no CUDA device"


@pytest.mark.parametrize(
    "k,n,group,expected",
    [
        (4096, 4096, 128, None),
        (28672, 8192, 128, None),
        (4100, 4096, 128, "input features must be a multiple of 32"),
        (4096, 4100, 128, "output features must be a multiple of 8"),
        (4160, 4096, 128, "input features are not a multiple of the group size 128 (partial last group)"),
        (4160, 4096, -1, None),
        (4096, 4096, 16, "group size 16 is below 32 (exllamav2 changes group once per 32 rows)"),
        (4032, 4096, 96, "group size 96 is not a power of two (exllamav2 derives it as one)"),
        (65568, 4096, -1, "more than 65,535 input features (exllamav2 stores the row order as int16)"),
    ],
)
def test_layer_limits(k, n, group, expected):
    config = QuantizeConfig(bits=4, group_size=group)
    assert exllama.kernel_spec().check_layer(LayerShape(name="l", in_features=k, out_features=n), config) == expected


def test_selection_falls_through_when_exllama_cannot_serve():
    layers = [LayerShape(name="l", in_features=8192, out_features=8192)]
    kernels = registered_kernels()
    for settings, why in [({"bits": 3}, "supports 4-bit, checkpoint is 3-bit")]:
        choice = select_kernel(QuantizeConfig(**settings), layers, H100, torch.float16, kernels)
        assert choice.chosen != "exllama"
        assert {v.name: v.reason for v in choice.verdicts}["exllama"] == why
    choice = select_kernel(QuantizeConfig(bits=4), layers, H100, torch.float32, kernels)
    assert {v.name: v.reason for v in choice.verdicts}["exllama"] == "computes in float16, not float32"


def test_asking_for_exllama_on_the_cpu_says_why(tmp_path):
    ck = build(tmp_path / "ck", bits=4, group_size=32, desc_act=True).path
    with pytest.raises(KernelError, match="kernel 'exllama' cannot serve this checkpoint on cpu.*runs on cuda"):
        load_model(str(ck), kernel="exllama", device="cpu")
