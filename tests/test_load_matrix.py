"""Every GPTQ setting loads and computes the logits of the weights it stands for.

Each checkpoint is a tiny Llama whose widths (160, 224) group size 128 does not divide, so partial last
groups are covered; the reference is a plain transformers model holding the dequantized float32 weights,
computed from the integers before packing (not through gptq-bridge's own unpacking).
"""

import itertools

import pytest
import torch
from tiny_checkpoints import build, relative_error

import gptq_bridge
from gptq_bridge.explain import explain

COMBOS = list(itertools.product([2, 3, 4, 8], [-1, 32, 128], [False, True], ["gptq", "gptq_v2"], [True, False]))


@pytest.mark.parametrize("location", ["quantize_config", "config"])
@pytest.mark.parametrize(
    "bits,group_size,desc_act,fmt,sym",
    COMBOS,
    ids=[f"{b}bit-g{g}-{'act' if a else 'noact'}-{f}-{'sym' if s else 'asym'}" for b, g, a, f, s in COMBOS],
)
def test_logits_match_dequantized_reference(tmp_path, bits, group_size, desc_act, fmt, sym, location):
    ck = build(
        tmp_path / "ck",
        bits=bits,
        group_size=group_size,
        desc_act=desc_act,
        sym=sym,
        checkpoint_format=fmt,
        config_location=location,
        seed=bits * 7 + group_size,
    )
    assert explain(str(ck.path), device="cpu").chosen == ("cpu-int4" if bits == 4 else "torch-dense")
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ck.reference(ids).logits
    for kernel in ("torch", "torch-dense"):  # dequantize per call, and once at load time
        lm = gptq_bridge.load_model(str(ck.path), device="cpu", dtype=torch.float32, kernel=kernel)
        assert lm.kernel == kernel and lm.quantize_config.bits == bits
        assert lm.config_file.path.name == ("quantize_config.json" if location == "quantize_config" else "config.json")
        with torch.no_grad():
            assert relative_error(lm.model(ids).logits, want) < 1e-4


def test_act_order_g_idx_matters(tmp_path):
    """Negative control: the comparison above would catch a kernel that ignored g_idx."""
    ck = build(tmp_path / "ck", bits=4, group_size=32, desc_act=True, sym=False)
    lm = gptq_bridge.load_model(str(ck.path), device="cpu", kernel="torch")
    layer = lm.model.model.layers[0].mlp.down_proj
    assert not torch.equal(layer.g_idx, torch.sort(layer.g_idx).values)  # really act-order
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert relative_error(lm.model(ids).logits, ck.reference(ids).logits) < 1e-4
        layer.g_idx = layer.default_g_idx(layer.g_idx.device)
        assert relative_error(lm.model(ids).logits, ck.reference(ids).logits) > 1e-3


def test_float16_and_bfloat16_load(tmp_path):
    ck = build(tmp_path / "ck", bits=4, group_size=32)
    ids = torch.randint(0, 96, (1, 8))
    for dtype in (torch.float16, torch.bfloat16):
        lm = gptq_bridge.load_model(str(ck.path), device="cpu", dtype=dtype)
        assert lm.model.model.layers[0].self_attn.q_proj.scales.dtype == dtype
        assert lm.model.model.embed_tokens.weight.dtype == dtype
        with torch.no_grad():
            assert relative_error(lm.model(ids).logits.float(), ck.reference(ids).logits) < 2e-2


def test_missing_g_idx_means_no_act_order(tmp_path):
    """Checkpoints from before act-order store no g_idx; rows then belong to group i // g."""
    from safetensors.torch import load_file, save_file

    ck = build(tmp_path / "ck", bits=4, group_size=32)
    path = ck.path / "model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if not k.endswith(".g_idx")}
    save_file(tensors, path, metadata={"format": "pt"})
    lm = gptq_bridge.load_model(str(ck.path), device="cpu", kernel="torch-dense")  # float32 math: exact to 1e-4
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert relative_error(lm.model(ids).logits, ck.reference(ids).logits) < 1e-4
