"""The CPU decode step (engine/cpu_step.py) against the engine's torch-op path on the same cache.

Tiny checkpoints of every bit width, act-order and a partial last group (widths 160 and 224 with group size
128); `cpu-int4` serves the 4-bit ones, `torch-dense` the others. Two requests of different lengths decode
side by side; each step's logits are compared with the torch path's, a request's row with the same request
decoded alone (the same numbers exactly), and a request whose cache blocks are not consecutive with one whose
blocks are.
"""

from __future__ import annotations

import pytest
import torch
from gen_models import one_thread  # noqa: F401 - one_thread is an autouse fixture
from tiny_checkpoints import build, llama_config, relative_error

import gptq_bridge
from gptq_bridge.engine import cpu_compiled
from gptq_bridge.engine.cpu_compiled import ENV, compiler_missing
from gptq_bridge.engine.cpu_step import CpuDecode
from gptq_bridge.engine.forward import decode_inputs, placed
from gptq_bridge.engine.generator import engine_for
from gptq_bridge.engine.scheduler import Sequence

COMBOS = [  # bits, group size, act-order, head
    (4, 32, False, "int8"),
    (4, 128, True, "float"),
    (4, 16, True, "int8"),
    (3, 128, True, "float"),
    (2, 32, False, "float"),
    (8, 128, True, "float"),
]


def torch_path(fwd, batch: list[Sequence]) -> torch.Tensor:
    """The same step through `run_segment` with the torch ops and the masked batch attention."""
    tokens, positions, write, tables, lengths = decode_inputs(batch, fwd.cache.block_size)
    plan = fwd.attention.decode_plan(tables, lengths)
    with torch.inference_mode():
        out = fwd.run_segment(
            fwd.segments[0],
            tokens,
            None,
            positions,
            write,
            lambda i, q, into: placed(fwd.attention.decode(i, q, plan), into),
        )
        return fwd.model.lm_head(out[None]).float()[0]


def request(fwd, prompt: list[int], blocks: list[int] | None = None) -> Sequence:
    seq = Sequence(prompt=prompt, max_new_tokens=40, sample=None)
    seq.blocks = blocks or fwd.cache.allocator.allocate(seq.reserve_tokens)
    fwd.clear(seq.blocks)
    fwd.prefill(seq, 0, len(prompt))
    seq.cached = len(prompt)
    return seq


@pytest.mark.parametrize(
    "bits,group_size,desc_act,head", COMBOS, ids=[f"{b}bit-g{g}-{'act' if a else 'noact'}-{h}" for b, g, a, h in COMBOS]
)
def test_cpu_step_matches_the_torch_path(tmp_path, bits, group_size, desc_act, head):
    ck = build(tmp_path / "ck", bits=bits, group_size=group_size, desc_act=desc_act, sym=False, seed=bits + group_size)
    lm = gptq_bridge.load_model(str(ck.path), device="cpu", head=head)
    assert lm.kernel == ("cpu-int4" if bits == 4 else "torch-dense") and lm.head == head
    fwd = engine_for(lm).forward
    gen = torch.Generator().manual_seed(bits)
    ids = torch.randint(0, 96, (2, 60), generator=gen).tolist()
    with torch.no_grad():
        reference = ck.reference(torch.tensor(ids)).logits  # float32 weights the checkpoint stands for
    a, b = request(fwd, ids[0][:37]), request(fwd, ids[1][:5])
    step, exact = None, bits == 4 and head == "int8"
    for _ in range(12):
        for s, row in ((a, ids[0]), (b, ids[1])):
            s.append(row[s.cached])  # the next token, at position `cached`
        want = torch_path(fwd, [a, b])
        got = fwd.decode([a, b])
        step = fwd._cpu_steps[id(fwd.segments[0])]
        assert isinstance(step, CpuDecode)
        ref = torch.stack([reference[0, a.cached], reference[1, b.cached]])
        # 4-bit: activations rounded to bfloat16, as cpu-int4's own tolerance (test_cpu_int4.py); else float32
        assert relative_error(got, want) < (1e-2 if bits == 4 else 1e-5)  # bfloat16: an ulp is 4e-3
        assert relative_error(got, ref) < (1.5e-2 if bits == 4 else 1e-5)
        alone = fwd.decode([b])[0]
        if exact:  # every op per row: alone, the same numbers as beside another request
            assert torch.equal(alone, got[1])
        else:  # a float matmul of 1 row and of 2 rows may sum in another order
            assert relative_error(alone, got[1]) < 1e-5
        a.cached += 1
        b.cached += 1
    assert step.head_int8 == (head == "int8")


def test_blocks_out_of_order_give_the_same_logits(tmp_path):
    """A request whose cache blocks are not consecutive reads them gathered; consecutive ones, as a slice."""
    ck = build(tmp_path / "ck", bits=4, group_size=32, sym=False)
    lm = gptq_bridge.load_model(str(ck.path), device="cpu")
    fwd = engine_for(lm).forward
    prompt = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    blocks, other = fwd.cache.allocator.allocate(32 * 4), fwd.cache.allocator.allocate(32 * 4)
    step = CpuDecode(fwd, fwd.segments[0])
    slice_read, gathered = step.reads(torch.tensor([blocks, other[::-1]]), torch.tensor([70, 70]))
    assert isinstance(slice_read, slice) and isinstance(gathered, torch.Tensor)
    consecutive, shuffled = request(fwd, prompt, blocks=blocks), request(fwd, prompt, blocks=other[::-1])
    for _ in range(3):
        got = fwd.decode([consecutive, shuffled])
        assert torch.equal(got[0], got[1])
        for s in (consecutive, shuffled):
            s.append(7)
            s.cached += 1


def test_compiled_stretch_gives_the_same_logits(tmp_path, monkeypatch):
    """The stretch between two attentions compiled (AOTInductor, in a background process): the same logits as
    op by op, alone and batched; a second load finds it in the cache."""
    if compiler_missing():
        pytest.skip(compiler_missing())
    monkeypatch.setenv("GPTQ_BRIDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(ENV, "1")
    # hidden 256: head_dim 64, so k and v (128 wide) fuse with q, as the compiled stretch needs
    ck = build(tmp_path / "ck", bits=4, group_size=32, sym=False, seed=11, hf_config=llama_config(hidden=256))
    lm = gptq_bridge.load_model(str(ck.path), device="cpu", head="int8")
    fwd = engine_for(lm).forward
    step = CpuDecode(fwd, fwd.segments[0])
    assert step.compiled is not None and step.compiled.runner() is None  # building: op by op meanwhile
    # a second process (the next CLI answer) started meanwhile waits for that build instead of repeating it
    monkeypatch.setattr(cpu_compiled, "_BUILDS", {})
    other = CpuDecode(fwd, fwd.segments[0]).compiled
    assert other._proc is None and other._other == step.compiled._proc.pid and other.runner() is None
    assert step.compiled.wait(timeout=900) == "compiled", step.compiled.status
    assert other.wait(timeout=60) == "compiled" and other._proc is None
    assert step.compiled.runner() is not None and list((tmp_path / "cache" / "compiled").glob("*.pt2"))
    monkeypatch.setenv(ENV, "0")
    by_ops = CpuDecode(fwd, fwd.segments[0])
    assert by_ops.compiled is None
    ids = torch.randint(0, 96, (2, 50), generator=torch.Generator().manual_seed(4)).tolist()
    a, b = request(fwd, ids[0][:30]), request(fwd, ids[1][:9])
    for _ in range(4):
        for s, row in ((a, ids[0]), (b, ids[1])):
            s.append(row[s.cached])
        inputs = decode_inputs([a, b], fwd.cache.block_size)
        with torch.inference_mode():
            want = by_ops(inputs[0], None, *inputs[1:])
            got = step(inputs[0], None, *inputs[1:])
            alone = decode_inputs([b], fwd.cache.block_size)
            got_alone = step(alone[0], None, *alone[1:])
        assert relative_error(got, want) < 1e-2  # bfloat16 logits: an ulp is 4e-3
        assert torch.equal(got_alone[0], got[1])
        a.cached += 1
        b.cached += 1
    monkeypatch.setenv(ENV, "1")
    again = CpuDecode(fwd, fwd.segments[0])  # the package is in the cache: loaded, not built
    assert again.compiled._proc is None and again.compiled.wait(timeout=120) == "compiled"


def test_compiling_is_skipped_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTQ_BRIDGE_CACHE", str(tmp_path / "cache"))
    ck = build(tmp_path / "ck", bits=4, group_size=32, sym=False, hf_config=llama_config(hidden=256))
    lm = gptq_bridge.load_model(str(ck.path), device="cpu")
    fwd = engine_for(lm).forward
    monkeypatch.setenv(ENV, "0")
    assert CpuDecode(fwd, fwd.segments[0]).compiled is None
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert "no C++ compiler" in compiler_missing()
    assert CpuDecode(fwd, fwd.segments[0]).compiled is None
    assert not (tmp_path / "cache" / "compiled").exists()  # nothing started
    dense = gptq_bridge.load_model(str(ck.path), device="cpu", kernel="torch-dense")  # not cpu-int4: op by op
    fwd = engine_for(dense).forward
    assert CpuDecode(fwd, fwd.segments[0]).compiled is None
