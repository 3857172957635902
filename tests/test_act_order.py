"""act_order.py: an act-order MLP's intermediate features put into its down projection's group order at load time, and fused projections that read their input in group order.

The reordered model must compute what the checkpoint says (the float reference the tiny checkpoint was made
from), its down projections must need no gather, and layouts the reorder does not cover must stay as stored.
"""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoints import build, llama_config, relative_error

import gptq_bridge
from gptq_bridge.act_order import OrderedInput, group_order, order_mlps, permute_columns, permute_rows, spare_gathers
from gptq_bridge.engine.forward import LlamaFamilyForward, cache_shape, decode_inputs, placed
from gptq_bridge.engine.kv_cache import PagedKVCache
from gptq_bridge.engine.scheduler import Sequence
from gptq_bridge.fusion import FusedLinear
from gptq_bridge.kernels.torch_ref import TorchQuantLinear
from gptq_bridge.packing import dequantize


def ids(shape=(2, 12), seed=5):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def dense(layer) -> torch.Tensor:
    """The layer's float weight [in, out], from its packed tensors."""
    return dequantize(
        layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.zero_offset, torch.float32
    )


def regular(layer) -> bool:
    return torch.equal(layer.g_idx.long(), torch.arange(layer.in_features) // layer.group_size)


@pytest.mark.parametrize("bits,fused", [(3, True), (4, True), (4, False)], ids=["3bit-fused", "4bit-fused", "4bit"])
def test_reordered_model_computes_the_checkpoint(tmp_path, bits, fused):
    """Fused gate/up (q/k/v and gate/up share their act-order, as GPTQ makes them) and separate ones. The loader
    reorders on a GPU only; here `order_mlps` is called by hand on the CPU model, before any kernel layout."""
    ck = build(tmp_path / "ck", bits=bits, group_size=32, desc_act=True, sym=False, seed=bits, shared_order=fused)
    lm = gptq_bridge.load_model(str(ck.path), device="cpu", dtype=torch.float32, kernel="torch")
    layers = lm.model.model.layers
    assert not any(regular(block.mlp.down_proj) for block in layers)  # act-order, left as stored on the CPU
    x = ids()
    with torch.no_grad():
        want = ck.reference(x).logits
        assert relative_error(lm.model(x).logits, want) < 1e-4
        assert order_mlps(lm.model) == len(layers)
        assert relative_error(lm.model(x).logits, want) < 1e-4
    for block in layers:
        assert regular(block.mlp.down_proj)  # ... and regular after the reorder
        assert not regular(block.self_attn.o_proj)  # its input is not the MLP's: left as stored
        assert isinstance(getattr(block.mlp, "gate_up_proj", None), FusedLinear) == fused
    assert order_mlps(lm.model) == 0  # once


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_permuting_columns_and_rows_moves_the_dense_weight(tmp_path, bits):
    ck = build(tmp_path / "ck", bits=bits, group_size=32, desc_act=True, sym=False, seed=2)
    lm = gptq_bridge.load_model(str(ck.path), device="cpu", dtype=torch.float32, kernel="torch", engine="off")
    mlp = lm.model.model.layers[0].mlp
    gate, down = mlp.gate_proj, mlp.down_proj
    gate_before, down_before = dense(gate), dense(down)
    order = group_order(down)
    assert order is not None and not torch.equal(order, torch.arange(down.in_features))
    permute_columns(gate, order)
    permute_rows(down, order)
    assert torch.equal(dense(gate), gate_before[:, order])
    assert torch.equal(dense(down), down_before[order])
    assert regular(down) and group_order(down) is None


def test_layouts_it_does_not_cover_stay_as_stored(tmp_path):
    plain = build(tmp_path / "plain", bits=4, group_size=32, desc_act=False, seed=3)
    lm = gptq_bridge.load_model(str(plain.path), device="cpu", dtype=torch.float32, kernel="torch")
    assert group_order(lm.model.model.layers[0].mlp.down_proj) is None  # regular already
    odd = build(tmp_path / "odd", bits=4, group_size=16, desc_act=True, seed=4)  # groups of 16: slot layout pads them
    lm = gptq_bridge.load_model(str(odd.path), device="cpu", dtype=torch.float32, kernel="torch")
    down = lm.model.model.layers[0].mlp.down_proj
    assert isinstance(down, TorchQuantLinear) and not regular(down) and group_order(down) is None
    uneven = down.g_idx.clone()
    uneven[uneven == 0] = 1  # group 0 empty, group 1 twice as large: not whole groups
    down.g_idx = uneven
    down.group_size = 32
    assert group_order(down) is None


def test_projections_read_their_input_in_group_order_in_the_engine_and_outside(tmp_path):
    """On a GPU the loader puts the MLP's features in down_proj's order and sorts the rows of fused q/k/v and
    gate/up and of o_proj by group; here the same is done by hand on the CPU: transformers' forward (the modules gather their input) and the engine's prefill (the norm
    and the attention write in the layer's order) and decode steps still compute the checkpoint."""
    wide = llama_config(hidden=256)  # k and v 128 wide: q/k/v fuse (fusion needs widths that are multiples of 32)
    ck = build(
        tmp_path / "ck", bits=4, group_size=32, desc_act=True, sym=False, seed=9, shared_order=True, hf_config=wide
    )
    lm = gptq_bridge.load_model(str(ck.path), device="cpu", dtype=torch.float32, kernel="torch")
    model = lm.model
    assert all(m.input_order is None for m in model.modules() if isinstance(m, FusedLinear))  # CPU: left as stored
    assert spare_gathers(model) == 4 * len(model.model.layers)  # the MLP, and the inputs of three projections
    assert spare_gathers(model) == 0  # once
    for block in model.model.layers:
        for fused in (block.self_attn.qkv_proj, block.mlp.gate_up_proj, block.self_attn.o_proj):
            assert regular(fused.linear) and fused.input_order is not None
        assert isinstance(block.self_attn.o_proj, OrderedInput)
    x = ids((1, 40), seed=6)
    with torch.no_grad():
        want = ck.reference(x).logits[0]
        assert relative_error(model(x).logits[0], want) < 1e-4
    cache = PagedKVCache(cache_shape(model, torch.float32), 256, torch.device("cpu"))
    fwd = LlamaFamilyForward(model, cache, max_positions=256)
    s = Sequence(prompt=x[0, :20].tolist(), max_new_tokens=20, sample=None)
    s.blocks = cache.allocator.allocate(s.reserve_tokens)
    cache.clear(s.blocks)
    with torch.inference_mode():
        assert relative_error(fwd.prefill(s, 0, 20), want[19]) < 1e-4
        s.cached = 20
        for t in range(20, 39):
            s.append(int(x[0, t]))
            assert relative_error(fwd.decode([s])[0], want[t]) < 1e-4, t  # the CPU step: the modules gather
            assert relative_error(ordered_step(fwd, s), want[t]) < 1e-4, t  # the norms and attention write in order
            s.cached += 1


def ordered_step(fwd, s: Sequence) -> torch.Tensor:
    """A decode step as on a GPU: run_segment with the torch ops writing each projection's input in its order."""
    tokens, positions, write, tables, lengths = decode_inputs([s], fwd.cache.block_size)
    plan = fwd.attention.decode_plan(tables, lengths)
    seg = fwd.segments[0]
    out = fwd.run_segment(
        seg, tokens, None, positions, write, lambda i, q, into: placed(fwd.attention.decode(i, q, plan), into), True
    )
    return fwd.model.lm_head(out[None]).float()[0, 0]
