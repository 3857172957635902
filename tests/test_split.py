"""A model split across devices, on the CPU: two "cpu" slots run the split machinery (segments, per-slot KV cache,
hidden states handed over, input moves in transformers' forward) and must give the unsplit model's logits."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch
from gen_models import one_thread  # noqa: F401 - one_thread is an autouse fixture
from tiny_checkpoints import build, llama_config

import gptq_bridge
from gptq_bridge.api import load_options
from gptq_bridge.commands import model_info
from gptq_bridge.engine.generator import engine_for
from gptq_bridge.engine.scheduler import Sequence
from gptq_bridge.errors import GPTQBridgeError
from gptq_bridge.explain import explain
from gptq_bridge.loader import plan_load
from gptq_bridge.placement import PlacementError
from gptq_bridge.plugins import resolve

KV = 256  # tokens of KV cache


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build(tmp_path_factory.mktemp("split") / "ckpt", hf_config=llama_config(layers=4), tokenizer=True).path


@pytest.fixture(scope="module")
def two_cpu_slots(ckpt):
    """max_memory as (device, size) pairs: the first "cpu" budget holds the embeddings and two layers exactly."""
    plan = plan_load(resolve(str(ckpt)), load_options(max_memory=[("cpu", "1GiB")], kv_cache=KV))
    s = plan.sizes["cpu"]
    first = s.embed + 2 * (s.layers[0] + s.kv_per_layer)
    return [("cpu", f"{first}B"), ("cpu", "1GiB")]


def test_the_split_places_whole_layers_on_each_slot(ckpt, two_cpu_slots):
    lm = gptq_bridge.load_model(str(ckpt), max_memory=two_cpu_slots, kv_cache=KV)
    p = lm.placement
    assert p.split and p.devices == ["cpu", "cpu"]
    assert [s.layers for s in p.slots] == [(0, 2), (2, 4)] and p.slots[0].embed and p.slots[1].head
    assert lm.kernels == {"cpu": lm.kernel} and lm.kv_cache == KV
    fwd = engine_for(lm).forward
    assert [(s.start, s.end, s.first, s.last) for s in fwd.segments] == [(0, 2, True, False), (2, 4, False, True)]
    assert fwd.cache.nbytes == sum(s.kv_bytes for s in p.slots)  # the cache the plan reserved, no more


def test_engine_logits_equal_the_unsplit_models(ckpt, two_cpu_slots):
    whole = engine_for(gptq_bridge.load_model(str(ckpt), device="cpu", kv_cache=KV)).forward
    split = engine_for(gptq_bridge.load_model(str(ckpt), max_memory=two_cpu_slots, kv_cache=KV)).forward
    assert split.split and not whole.split
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (2, 60)).tolist()
    pairs = []
    for fwd in (whole, split):
        a = Sequence(prompt=ids[0][:30], max_new_tokens=30, sample=None)
        b = Sequence(prompt=ids[1][:9], max_new_tokens=51, sample=None)
        for s in (a, b):
            s.blocks = fwd.cache.allocator.allocate(s.reserve_tokens)
            fwd.clear(s.blocks)
        pairs.append((fwd, a, b))
    logits = []
    for fwd, a, b in pairs:
        out = [fwd.prefill(a, 0, 17), fwd.prefill(a, 17, 30), fwd.prefill(b, 0, 9)]  # a prompt in two chunks
        a.cached, b.cached = 30, 9
        for _ in range(12):  # two requests of different lengths in one batch
            a.append(ids[0][a.cached])
            b.append(ids[1][b.cached])
            out.append(fwd.decode([a, b]))
            a.cached += 1
            b.cached += 1
        logits.append(out)
    for got, want in zip(logits[1], logits[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    spread = torch.stack([x.std() for x in logits[0][:3]])
    assert float(spread.min()) > 0.05  # real logits, not a degenerate constant


def test_transformers_path_logits_equal_the_unsplit_models(ckpt, two_cpu_slots):
    whole = gptq_bridge.load_model(str(ckpt), device="cpu", engine="off")
    split = gptq_bridge.load_model(str(ckpt), max_memory=two_cpu_slots, kv_cache=KV, engine="off")
    layers = split.model.model.layers
    assert all(len(layer._forward_pre_hooks) == 1 for layer in layers)  # inputs moved at every layer
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want, got = whole.model(ids).logits, split.model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for p in ("the a of to", "is it you"):
        a = whole.generate(p, max_new_tokens=16, ban_eos=True)
        b = split.generate(p, max_new_tokens=16, ban_eos=True)
        assert b.token_ids == a.token_ids and b.finish_reason == "length"


def test_split_engine_batches_concurrent_requests_with_the_unsplit_tokens(ckpt, two_cpu_slots):
    whole = gptq_bridge.load_model(str(ckpt), device="cpu", kv_cache=KV)
    split = gptq_bridge.load_model(str(ckpt), max_memory=two_cpu_slots, kv_cache=KV)
    prompts = ["the a of", "to to and in", "is it you that he"]
    want = {p: whole.generate(p, max_new_tokens=20, ban_eos=True).token_ids for p in prompts}
    got: dict[str, list[int]] = {}
    start = threading.Barrier(len(prompts))
    engine = engine_for(split)
    before = engine.steps

    def run(p):
        start.wait()
        got[p] = split.generate(p, max_new_tokens=20, ban_eos=True).token_ids

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    assert engine.steps - before < 3 * 20  # the requests shared decode steps


def test_a_model_that_does_not_fit_names_what_is_missing(ckpt):
    with pytest.raises(PlacementError, match=r"does not fit: layers \d-3 and the head need .* missing on cpu"):
        # torch-dense: its float32 weights are what 2 MiB cannot hold, whatever kernel auto prefers
        gptq_bridge.load_model(str(ckpt), max_memory={"cpu": "2MiB"}, kv_cache=KV, kernel="torch-dense")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(device="cpu", max_memory={"cpu": "1GiB"}), r"device 'cpu' and a split across devices both given"),
        (dict(device_map="balanced"), r"device_map: 'balanced'; only 'auto'"),
        (dict(device_map="auto", gpu_split=[1]), r"device_map='auto' chooses the budgets itself"),
        (dict(max_memory={"cpu": "lots"}), r"max_memory\['cpu'\]: 'lots' is not a size"),
    ],
)
def test_bad_split_options_are_named(ckpt, kwargs, match):
    with pytest.raises(GPTQBridgeError, match=match):
        gptq_bridge.load_model(str(ckpt), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_a_gpu_split_without_gpus_says_so(ckpt):
    with pytest.raises(GPTQBridgeError, match=r"device 'cuda:0' asked for, but torch sees no CUDA device"):
        gptq_bridge.load_model(str(ckpt), gpu_split=[20, 24])


def test_info_and_explain_show_the_placement_with_bytes_per_device(ckpt, two_cpu_slots):
    info = model_info(str(ckpt), max_memory=two_cpu_slots, kv_cache=KV)
    slots = info["placement"]
    assert [s["layers"] for s in slots] == [[0, 2], [2, 4]] and info["kv_cache_tokens_reserved"] == KV
    assert all(s["kv_cache_bytes"] > 0 and s["weights_bytes"] > 0 for s in slots)
    e = explain(str(ckpt), max_memory=two_cpu_slots, kv_cache=KV)
    assert e.placement == slots
    cli = [sys.executable, "-m", "gptq_bridge.cli"]
    out = subprocess.run(
        [*cli, "info", str(ckpt), "--max-memory", "cpu=1GiB", "--kv-cache", str(KV)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (
        "split:         1 device, KV cache of 256 tokens" in out and "cpu: embeddings, layers 0-3, head: weights" in out
    )
    assert "KV cache" in out
    data = json.loads(
        subprocess.run(
            [*cli, "explain", str(ckpt), "--max-memory", "cpu=1GiB", "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert data["placement"][0]["layers"] == [0, 4] and data["kernel_per_device"] == {"cpu": info["kernel"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine 'auto' fills the GPUs first")
def test_device_map_auto_on_the_cpu_fits_in_the_memory_available(ckpt):
    lm = gptq_bridge.load_model(str(ckpt), device_map="auto")
    assert lm.placement.devices == ["cpu"] and not lm.placement.split and lm.placement.slots[0].layers == (0, 4)
    assert lm.kv_cache is None  # not split: the engine's own default budget


def test_a_tied_head_split_from_its_embeddings(tmp_path):
    config = llama_config(layers=2)
    config.tie_word_embeddings = True
    path = build(tmp_path / "tied", hf_config=config, tokenizer=True).path
    plan = plan_load(resolve(str(path)), load_options(max_memory=[("cpu", "1GiB")], kv_cache=KV))
    s = plan.sizes["cpu"]
    assert s.tied
    first = s.embed + s.layers[0] + s.kv_per_layer
    slots = [("cpu", f"{first}B"), ("cpu", "1GiB")]
    split = gptq_bridge.load_model(str(path), max_memory=slots, kv_cache=KV)
    whole = gptq_bridge.load_model(str(path), device="cpu", kv_cache=KV)
    head = split.placement.slots[1]
    assert head.head and head.weights_bytes == s.layers[1] + s.head  # the head counted as a copy beside it
    for p in ("the a of to", "is it you"):
        assert split.generate(p, max_new_tokens=12, ban_eos=True).token_ids == (
            whole.generate(p, max_new_tokens=12, ban_eos=True).token_ids
        )
