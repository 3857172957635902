"""How `quantize` keeps host memory bounded: the source read one block at a time, calibration states in the
model's dtype, the output streamed to disk, and the Hessian factored with at most two float64 copies.

Each test checks the thing on real (tiny) models and files; the memory itself is measured on a large model by
bench/quantize_memory.py (docs/QUALITY.md).
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_checkpoints import WORDS, llama_config, tiny_tokenizer
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from gptq_bridge.config import QuantizeConfig
from gptq_bridge.quantize import (
    BlockJob as _BlockJob,
)
from gptq_bridge.quantize import (
    Source,
    load_model_by_blocks,
    quantize,
    quantize_block,
    resolve_settings,
)
from gptq_bridge.quantize.gptq import CrossMoment, Hessian, prepare_hessian
from gptq_bridge.safetensors_io import SafetensorsFile
from gptq_bridge.writer import CheckpointWriter

torch.set_num_threads(1)


def save_model(
    path: Path, dtype: torch.dtype, *, seed: int = 0, tie: bool = False, layers: int = 3, shard: str | None = None
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = llama_config(layers=layers)
    config.tie_word_embeddings = tie
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(str(path), **({"max_shard_size": shard} if shard else {}))
    tiny_tokenizer(config.vocab_size).save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def calib_text() -> str:
    rng = random.Random(1)
    return " ".join(rng.choice(WORDS) for _ in range(2500))


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ----------------------------------------------------------------------------------- streamed output


def test_checkpoint_writer_streams_tensors_into_valid_aligned_safetensors(tmp_path):
    tensors = {
        "a.half": torch.randn(3, 5).half(),
        "b.bf16": torch.randn(7).bfloat16(),
        "c.int32": torch.randint(-(2**31), 2**31 - 1, (4, 3), dtype=torch.int32),
        "d.float": torch.randn(2, 2, 2),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 4, dtype=torch.int32),
        "g.int64": torch.arange(5),
        "h.u8": torch.arange(9, dtype=torch.uint8),
    }
    config = QuantizeConfig(bits=4, group_size=32, model_file_base_name="w")
    hf_config = llama_config()
    with CheckpointWriter(tmp_path / "out") as writer:
        spool_dir = writer.tmp
        for name, t in tensors.items():
            writer.add(name, t.t() if t.dim() == 2 else t)  # non-contiguous input is fine
        assert sorted(p.name for p in spool_dir.iterdir()) == [".pid", ".tensors.spool"]
        assert not (tmp_path / "out").exists()  # nothing in place before finish
        writer.finish(hf_config, config)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "quantize_config.json", "w.safetensors"]
    got = file_tensors(out / "w.safetensors")
    for name, t in tensors.items():
        want = t.t() if t.dim() == 2 else t
        assert got[name].dtype == t.dtype and torch.equal(got[name], want), name
    with SafetensorsFile(out / "w.safetensors") as f:  # the project's own reader checks every offset
        assert sorted(f.keys()) == sorted(tensors) and f.metadata["gptq_bits"] == "4"
    raw = (out / "w.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 8 == 0
    for name, info in header.items():
        if name != "__metadata__":  # each tensor starts at a multiple of its element size
            assert info["data_offsets"][0] % tensors[name].element_size() == 0, name
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no spool or temporary directory left


def test_checkpoint_writer_shards_and_leaves_nothing_when_interrupted(tmp_path):
    config = QuantizeConfig(bits=4, group_size=32, model_file_base_name="w")
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    with CheckpointWriter(tmp_path / "sharded") as writer:
        for name, t in tensors.items():
            writer.add(name, t)
        writer.finish(llama_config(), config, max_shard_bytes=2500)
    index = json.loads((tmp_path / "sharded" / "w.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "t0": "w-00001-of-00003.safetensors",
        "t1": "w-00001-of-00003.safetensors",
        "t2": "w-00002-of-00003.safetensors",
        "t3": "w-00002-of-00003.safetensors",
        "t4": "w-00003-of-00003.safetensors",
    }
    assert index["metadata"]["total_size"] == 5 * 1024
    for name, shard in index["weight_map"].items():
        assert torch.equal(file_tensors(tmp_path / "sharded" / shard)[name], tensors[name])

    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(tmp_path / "stopped") as writer:
            writer.add("x", torch.ones(10))
            raise KeyboardInterrupt
    with pytest.raises(Exception, match="written twice"):
        with CheckpointWriter(tmp_path / "twice") as writer:
            writer.add("x", torch.ones(1))
            writer.add("x", torch.ones(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]


def test_a_killed_writers_partial_directory_is_removed_by_the_next_writer(tmp_path):
    """SIGKILL leaves the spool behind (no handler runs); the next run for that output removes it, but not
    the partial directory of a writer that is still alive."""
    script = textwrap.dedent(f"""
        import os, torch
        from gptq_bridge.writer import CheckpointWriter
        w = CheckpointWriter({str(tmp_path / "out")!r})
        w.add("x", torch.ones(1000))
        w._spool.flush()
        print("ready", flush=True)
        os.kill(os.getpid(), 9)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9 and "ready" in proc.stdout
    (stale,) = tmp_path.iterdir()
    assert stale.name.startswith(".out.partial-") and (stale / ".tensors.spool").stat().st_size == 4000
    with CheckpointWriter(tmp_path / "out") as live:  # this process is alive: its directory must stay
        with CheckpointWriter(tmp_path / "out") as other:
            assert not stale.exists() and live.tmp.exists() and other.tmp.exists()
            other.add("y", torch.zeros(2))
            other.finish(llama_config(), QuantizeConfig(bits=4, group_size=32))
        assert live.tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------- one block at a time


@pytest.mark.parametrize("tie,shard", [(False, None), (True, None), (False, "200KB")])
def test_the_source_is_read_block_by_block(tmp_path, tie, shard):
    saved = save_model(tmp_path / "src", torch.float16, tie=tie, shard=shard)
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file() == bool(shard)
    model, weights = load_model_by_blocks(Source(text="src", path=tmp_path / "src", gguf=False))
    try:
        state = saved.state_dict()
        for name, p in model.named_parameters():
            if name.startswith("model.layers."):
                assert p.is_meta, name  # no block is read yet
            else:
                assert p.dtype == torch.float16 and torch.equal(p, state[name]), name
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
        whole = AutoModelForCausalLM.from_pretrained(str(tmp_path / "src"), dtype="auto")
        assert torch.equal(model.model.rotary_emb.inv_freq, whole.model.rotary_emb.inv_freq)  # computed likewise
        block = model.model.layers[1]
        weights.fill(block, "model.layers.1")
        for name, p in block.named_parameters():
            assert torch.equal(p, state[f"model.layers.1.{name}"]), name
        assert all(p.is_meta for p in model.model.layers[0].parameters())
        assert all(p.is_meta for p in model.model.layers[2].parameters())
    finally:
        weights.close()


def test_sources_whose_tensor_names_differ_from_the_model_are_loaded_whole(tmp_path, calib_text):
    save_model(tmp_path / "src", torch.float32, layers=2)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "src" / "model.safetensors"))
    state["model.extra_tensor"] = torch.zeros(3)  # a name the model does not have (transformers drops it)
    save_file(state, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    assert load_model_by_blocks(Source(text="src", path=tmp_path / "src", gguf=False)) is None
    result = quantize(
        tmp_path / "src",
        tmp_path / "q",
        bits=4,
        group_size=32,
        texts=[calib_text],
        nsamples=4,
        seq_len=64,
        device="cpu",
        progress=False,
    )
    assert (result.path / "gptq_model-4bit-32g.safetensors").is_file()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_by_block_gives_the_same_checkpoint_as_the_whole_model(tmp_path, calib_text, dtype):
    """The source read block by block (lazily) and the same model loaded whole by transformers quantize to
    identical tensors: the lazy path reads exactly the weights transformers would."""
    save_model(tmp_path / "src", dtype)
    kw = dict(
        bits=4, group_size=32, desc_act=True, texts=[calib_text], nsamples=6, seq_len=64, device="cpu", progress=False
    )
    quantize(tmp_path / "src", tmp_path / "lazy", **kw)
    whole = AutoModelForCausalLM.from_pretrained(str(tmp_path / "src"), dtype="auto")
    assert whole.dtype == dtype
    quantize(tmp_path / "src", tmp_path / "whole", model=whole, tokenizer=tiny_tokenizer(), **kw)
    a = file_tensors(tmp_path / "lazy" / "gptq_model-4bit-32g.safetensors")
    b = file_tensors(tmp_path / "whole" / "gptq_model-4bit-32g.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------- calibration states in model dtype


@pytest.mark.parametrize("fp_targets", [False, True])
@pytest.mark.parametrize("batches", [1, 2])
def test_states_are_kept_in_their_own_dtype_and_computed_in_the_blocks(fp_targets, batches):
    """float16 states through a float32 block quantize exactly as the same values in float32 do (the block
    computes in float32 either way); the outputs come back in float16."""
    torch.manual_seed(6)
    block = LlamaForCausalLM(llama_config(layers=1)).model.layers[0].float().eval()
    rotary = LlamaForCausalLM(llama_config(layers=1)).model.rotary_emb
    states16 = [torch.randn(2, 32, 160).half() for _ in range(batches)]
    position = torch.arange(32).unsqueeze(0)
    kwargs = [{"position_embeddings": rotary(s.float(), position)} for s in states16]
    settings = resolve_settings(bits=4, group_size=32, desc_act=True, sym=True)
    results = {}
    for dtype in (torch.float16, torch.float32):
        job = _BlockJob(settings=settings, clip=True, refit=True, prefix="b", tensors={}, reports=[])
        states = [s.to(dtype) for s in states16]
        fp = [s.clone() for s in states] if fp_targets else None
        out = quantize_block(copy.deepcopy(block), states, kwargs, job, True, fp_states=fp)
        outputs = out[0] if fp_targets else out
        assert all(o.dtype == dtype for o in outputs)
        results[dtype] = job.tensors, outputs
    (t16, o16), (t32, o32) = results[torch.float16], results[torch.float32]
    assert t16.keys() == t32.keys() and all(torch.equal(t16[k], t32[k]) for k in t16)
    assert all(torch.equal(a, b.half()) for a, b in zip(o16, o32))


def test_the_heap_is_kept_for_reuse_only_where_layers_are_narrow():
    """SmolLM2's widths (576 / 1536) keep freed memory for reuse; Llama-2-7B's (4096 / 11008) do not."""
    from gptq_bridge.quantize.heap import heap_reuse_pays as _heap_reuse_pays
    from gptq_bridge.quantize.source import find_blocks

    for hidden, intermediate, pays in ((576, 1536, True), (4096, 11008, False), (2048, 5504, False)):
        config = llama_config(hidden=hidden, intermediate=intermediate, layers=1)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        assert _heap_reuse_pays(find_blocks(model)[1]) is pays, (hidden, intermediate)


def test_memory_after_each_block_does_not_grow_with_the_blocks_done(tmp_path, calib_text):
    """With wide layers (forced here on a small model), quantize keeps glibc's mmap threshold fixed, so the
    large tensors of a block are given back to the kernel when freed. Under glibc's default (the threshold
    rises to 32 MiB after the first forward pass), they came from the heap and fragmented it: the resident
    memory after each block grew by more than a block's float16 weights per block (measured +64 and +76 MiB
    over 3-4 blocks of 6.2 MiB here; 0 with the fixed threshold), and so did the peak of deep models."""
    import ctypes

    try:
        _ = ctypes.CDLL("libc.so.6").mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        pytest.skip("glibc's allocator behaviour")
    torch.manual_seed(0)
    config = llama_config(hidden=512, intermediate=1408, layers=6)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(str(tmp_path / "src"))
    tiny_tokenizer(config.vocab_size).save_pretrained(str(tmp_path / "src"))
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    del model
    (tmp_path / "calib.txt").write_text(" ".join([calib_text] * 4))
    script = textwrap.dedent(f"""
        import ctypes, json, resource, sys, torch
        import gptq_bridge.quantize as q, gptq_bridge.quantize.heap as heap
        torch.set_num_threads(1)
        heap.HEAP_REUSE_MAX_WIDTH = 0  # the policy for wide layers (Llama-2-7B's), on this small model
        libc = ctypes.CDLL("libc.so.6")
        class Mallinfo2(ctypes.Structure):
            _fields_ = [(f, ctypes.c_size_t) for f in ("arena ordblks smblks hblks hblkhd usmblks fsmblks "
                                                      "uordblks fordblks keepcost").split()]
        libc.mallinfo2.restype = Mallinfo2
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        rows = []
        def progress(p):
            if p.stage == "block":  # resident, peak, and free memory the heap holds
                rows.append((rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                             libc.mallinfo2().fordblks))
        q.quantize({str(tmp_path / "src")!r}, {str(tmp_path / "q")!r}, bits=4, group_size=128, desc_act=True,
                   dataset=[{str(tmp_path / "calib.txt")!r}], nsamples=8, seq_len=128, device="cpu",
                   progress=progress)
        print(json.dumps(rows))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    assert len(rows) == 6
    resident, peak, free = ([row[k] for row in rows] for k in range(3))
    mib = [[v >> 20 for v in values] for values in (resident, peak, free)]
    report = "after each block (MiB): resident {}, peak {}, free in the heap {}".format(*mib)
    # from the second block on (the first one also pays for one-time allocations), what the process holds
    # between blocks stays where it was, within a block's float16 weights either way
    assert all(abs(f - free[1]) < block_bytes for f in free[2:]), report
    assert all(abs(r - resident[1]) < block_bytes for r in resident[2:]), report
    assert peak[-1] - peak[1] < 2 * block_bytes, report


# ------------------------------------------------------------------------- the Hessian's float64 copies


def test_hessian_matrix_in_place_and_consumed_statistics_are_unchanged():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(900, 600, generator=g)
    h = Hessian(600, rows_per_step=400)
    h.add(x)
    upper = h.sum.triu()
    reference = (upper + upper.triu(1).t()) * (2.0 / 900)  # the plain formula
    assert torch.equal(h.matrix(), reference)
    a = prepare_hessian(h.matrix(), desc_act=True, damp_percent=0.01)
    b = prepare_hessian(h, desc_act=True, damp_percent=0.01)  # consumes the running sum
    assert torch.equal(a.upper, b.upper) and torch.equal(a.perm, b.perm) and torch.equal(a.hessian, b.hessian)
    with pytest.raises(ValueError, match="already taken"):
        h.matrix()
    c = CrossMoment(600, 600)
    c.add(x, x.flip(1))
    want = c.matrix()
    assert torch.equal(c.matrix(consume=True), want)
    with pytest.raises(ValueError, match="already taken"):
        c.matrix()


def test_preparing_a_hessian_needs_about_two_more_float64_copies():
    """A 3072-wide Hessian (72 MiB in float64): preparing it (act-order, inverse factor) from its running sum
    raises the process's peak resident memory (the kernel's exact VmHWM) by about two float64 copies of it
    (2.24 here; mirroring and factoring out of place, as the code once did, needed over 4)."""
    n = 3072
    script = textwrap.dedent(f"""
        import torch
        from gptq_bridge.quantize.gptq import Hessian, prepare_hessian
        torch.set_num_threads(1)
        def status_kb(key):
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith(key))
        n = {n}
        h = Hessian(n)
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            h.add(torch.randn(1024, n, generator=g))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current resident size
        before = status_kb("VmRSS")
        prepared = prepare_hessian(h, desc_act=True, damp_percent=0.01)
        print(before, status_kb("VmHWM"))
    """)
    # large blocks straight from (and back to) the kernel: the peak is then the tensors alive at once
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "0"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    before_kb, peak_kb = map(int, proc.stdout.split())
    copies = (peak_kb - before_kb) * 1024 / (n * n * 8)
    # the result alone holds two float32 [n, n] matrices (the original and the factor), one float64 copy:
    # a peak below that did not see the preparation
    assert 1 < copies < 2.5, copies
