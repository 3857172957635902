"""`cpu-int4` (4-bit weights on the CPU) and the quantized output heads (head.py).

cpu-int4 rounds activations to bfloat16 (the only fast dtype of torch's packed int4 op), so its logits are held
to what the reference kernel itself reaches in bfloat16 on the same checkpoint, not to float32's 1e-4.
"""

import pytest
import torch
from tiny_checkpoints import build, llama_config, relative_error

import gptq_bridge
from gptq_bridge.errors import GPTQBridgeError
from gptq_bridge.explain import explain
from gptq_bridge.head import Int4Head, Int8Head
from gptq_bridge.kernels.cpu_int4 import CpuInt4Linear

# widths 160 and 224: group size 128 leaves a partial last group; group size 16 puts two groups in one block of
# 32 rows, so every group is padded and the input gathered (as with act-order groups of uneven size)
COMBOS = [
    (32, False, False),
    (32, True, False),
    (128, False, True),
    (128, True, True),
    (-1, False, True),
    (16, True, False),
]


@pytest.mark.parametrize(
    "group_size,desc_act,sym",
    COMBOS,
    ids=[f"g{g}-{'act' if a else 'noact'}-{'sym' if s else 'asym'}" for g, a, s in COMBOS],
)
def test_logits_within_the_reference_kernels_bfloat16_tolerance(tmp_path, group_size, desc_act, sym):
    ck = build(tmp_path / "ck", bits=4, group_size=group_size, desc_act=desc_act, sym=sym, seed=group_size + 3)
    assert explain(str(ck.path), device="cpu").chosen == "cpu-int4"
    lm = gptq_bridge.load_model(str(ck.path), device="cpu", head="float")
    ref_bf16 = gptq_bridge.load_model(str(ck.path), device="cpu", dtype=torch.bfloat16, kernel="torch", head="float")
    assert lm.kernel == "cpu-int4" and lm.head == "float"
    layer = lm.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, CpuInt4Linear) and layer.qweight is None  # only the 4-bit layout stays
    assert (layer.source is not None) == (desc_act or group_size == 16)
    gen = torch.Generator().manual_seed(1)
    for shape in ((1, 9), (2, 40)):  # a few rows and a prompt's worth
        ids = torch.randint(0, 96, shape, generator=gen)
        with torch.no_grad():
            want = ck.reference(ids).logits
            err = relative_error(lm.model(ids).logits, want)
            err_ref = relative_error(ref_bf16.model(ids).logits.float(), want)
        assert err < 1.5e-2 and err < 2 * err_ref, (shape, err, err_ref)


def test_act_order_gather_matters(tmp_path):
    """Negative control: with the act-order gather dropped, the logits are far off."""
    ck = build(tmp_path / "ck", bits=4, group_size=32, desc_act=True, sym=False)
    lm = gptq_bridge.load_model(str(ck.path), device="cpu", head="float")
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(lm.model(ids).logits, ck.reference(ids).logits) < 1.5e-2
        for module in lm.model.modules():
            if isinstance(module, CpuInt4Linear):
                module.source = torch.arange(module.in_features)  # rows in checkpoint order, groups mixed
        assert relative_error(lm.model(ids).logits, ck.reference(ids).logits) > 0.1


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_bit_widths_fall_back_to_dense(tmp_path, bits):
    ck = build(tmp_path / "ck", bits=bits, group_size=32)
    e = explain(str(ck.path), device="cpu")
    reasons = {v.name: v.reason for v in e.kernels}
    assert e.chosen == "torch-dense" and reasons["cpu-int4"] == f"supports 4-bit, checkpoint is {bits}-bit"


def test_shapes_the_op_cannot_take_fall_back_to_dense(tmp_path):
    cfg = llama_config()
    cfg.num_key_value_heads = 1  # k and v: 40 outputs, not a multiple of the op's 16
    ck = build(tmp_path / "ck", bits=4, group_size=32, hf_config=cfg)
    e = explain(str(ck.path), device="cpu")
    reasons = {v.name: v.reason for v in e.kernels}
    assert e.chosen == "torch-dense"
    assert "(160x40): output features must be a multiple of 16" in reasons["cpu-int4"]


def _grid_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A weight that 4-bit asymmetric groups of 32 hold exactly: each group spans 0..15 steps of a power of 2."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features), generator=g)
    q[:, 0::32], q[:, 1::32] = 0, 15
    z = torch.randint(0, 16, (out_features, in_features // 32, 1), generator=g)
    s = 2.0 ** -torch.randint(4, 8, (out_features, in_features // 32, 1), generator=g)
    return ((q.view(out_features, -1, 32) - z) * s).view(out_features, in_features).float()


def test_int4_head_is_exact_on_its_grid():
    w = _grid_weight(96, 160, 0)
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(1))
    want = x @ w.t()
    head = Int4Head(w, None)
    assert relative_error(head(x), want) < 5e-3  # bfloat16 activations only: the weights are exact
    assert relative_error(head(x.repeat(30, 1)), want.repeat(30, 1)) < 5e-3  # many rows
    noisy = w + 0.3 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    assert relative_error(Int4Head(noisy, None)(x), x @ noisy.t()) > 2e-2  # off the grid it rounds


def test_int8_head():
    w = torch.randn(96, 160, generator=torch.Generator().manual_seed(3))
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(4))
    assert relative_error(Int8Head(w, None)(x), x @ w.t()) < 1.5e-2


def test_head_option(tmp_path):
    ck = build(tmp_path / "ck", bits=4, group_size=32)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(5))
    auto = gptq_bridge.load_model(str(ck.path), device="cpu")
    assert auto.head == "float" and type(auto.model.lm_head) is torch.nn.Linear  # not measured: left as it is
    for head, cls in (("int4", Int4Head), ("int8", Int8Head)):
        lm = gptq_bridge.load_model(str(ck.path), device="cpu", head=head)
        assert lm.head == head and isinstance(lm.model.lm_head, cls)
        with torch.no_grad():
            got, want = lm.model(ids).logits, auto.model(ids).logits
        assert relative_error(got, want) < 0.2  # random weights off any grid: 4-bit rounding of the head
    with pytest.raises(GPTQBridgeError, match="head: 'int3' is not one of"):
        gptq_bridge.load_model(str(ck.path), device="cpu", head="int3")


def test_engine_generates_with_cpu_int4_like_the_eager_path(tmp_path):
    ck = build(tmp_path / "ck", bits=4, group_size=32, sym=False, tokenizer=True)
    kwargs = dict(max_new_tokens=12, ban_eos=True)
    prompt = "the a of to and in is it"
    engine = gptq_bridge.load_model(str(ck.path), device="cpu")
    eager = gptq_bridge.load_model(str(ck.path), device="cpu", engine="off")
    assert engine.kernel == eager.kernel == "cpu-int4"
    with torch.no_grad():
        ids = torch.tensor([engine.tokenizer(prompt)["input_ids"]])
        err = relative_error(engine.model(ids).logits, eager.model(ids).logits)  # fused q/k/v, gate/up: same sums
    assert err < 1e-5
    a, b = engine.generate(prompt, **kwargs), eager.generate(prompt, **kwargs)
    assert len(a.token_ids) == 12 and a.token_ids[:4] == b.token_ids[:4]
