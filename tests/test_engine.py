"""The decode engine on the CPU: scheduling and cache bookkeeping, its forward against transformers', and
generation through it (batched requests give the same tokens as requests alone)."""

from __future__ import annotations

import threading

import pytest
import torch
from gen_models import one_thread, word_checkpoint  # noqa: F401 - one_thread is an autouse fixture
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import gptq_bridge
from gptq_bridge.engine.forward import LlamaFamilyForward, cache_shape, unsupported_reason
from gptq_bridge.engine.generator import engine_for, engine_status
from gptq_bridge.engine.kv_cache import BlockAllocator, CacheBudgetError, PagedKVCache, budget_tokens, parse_budget
from gptq_bridge.engine.scheduler import End, Scheduler, Sequence
from gptq_bridge.errors import GPTQBridgeError

# --- scheduling and the cache's bookkeeping -------------------------------------------------------------------


def seq(prompt: int, new: int) -> Sequence:
    return Sequence(prompt=list(range(3, 3 + prompt)), max_new_tokens=new, sample=lambda logits, s: 0)


def test_blocks_are_reserved_for_the_whole_request_and_freed_when_it_ends():
    alloc = BlockAllocator(num_blocks=9, block_size=32)  # 8 usable: block 0 is padding
    sched = Scheduler(alloc, max_batch=8)
    a, b, c = seq(40, 60), seq(100, 28), seq(10, 10)  # 4, 4 and 1 blocks
    for s in (a, b, c):
        sched.submit(s)
    step, _ = sched.plan()
    assert step.admitted == [a, b] and alloc.free_blocks == 0 and 0 not in a.blocks + b.blocks
    assert c in sched.waiting  # the oldest waiting request waits for room; none jumps ahead
    sched.finish(a, "length")
    step, _ = sched.plan()
    assert step.admitted == [c] and alloc.free_blocks == 3


def test_a_request_that_can_never_fit_is_refused_with_the_numbers():
    sched = Scheduler(BlockAllocator(num_blocks=5, block_size=32))
    with pytest.raises(CacheBudgetError, match=r"needs 200 tokens .*prompt 100 \+ max_new_tokens 100.*holds 128"):
        sched.submit(seq(100, 100))


def test_a_long_prompt_is_read_one_chunk_per_step_while_others_decode():
    sched = Scheduler(BlockAllocator(num_blocks=64, block_size=32), prefill_chunk=128, prefill_alone=256)
    short, long = seq(8, 100), seq(400, 10)
    sched.submit(short)
    step, _ = sched.plan()
    assert step.prefill == [(short, 0, 8)]
    short.cached = 8
    sched.submit(long)
    ranges = []
    for _ in range(4):
        step, _ = sched.plan()
        assert step.decode == [short]  # the running stream moves at every step
        ((s, start, end),) = step.prefill
        ranges.append((start, end))
        s.cached = end
        short.cached += 1
    assert ranges == [(0, 128), (128, 256), (256, 384), (384, 400)]
    step, _ = sched.plan()
    assert step.prefill == [] and step.decode == [short, long]


def test_prompts_are_packed_into_one_chunk_and_a_lone_prompt_gets_a_larger_one():
    sched = Scheduler(BlockAllocator(num_blocks=128, block_size=32), prefill_chunk=128, prefill_alone=256)
    a, b, c = seq(100, 4), seq(100, 4), seq(100, 4)
    for s in (a, b, c):
        sched.submit(s)
    step, _ = sched.plan()  # nobody decodes yet: 256 tokens, oldest first, the last one cut
    assert step.prefill == [(a, 0, 100), (b, 0, 100), (c, 0, 56)]
    for s, _, end in step.prefill:
        s.cached = end
    step, _ = sched.plan()  # a and b decode now: the rest of c fits the 128-token chunk
    assert step.decode == [a, b] and step.prefill == [(c, 56, 100)]


def test_cancelled_requests_leave_at_the_next_step_and_free_their_blocks():
    alloc = BlockAllocator(num_blocks=17, block_size=32)
    sched = Scheduler(alloc, max_batch=2)
    a, b, c = seq(30, 2), seq(30, 2), seq(30, 2)
    for s in (a, b, c):
        sched.submit(s)
    sched.plan()
    b.cancel.set()
    caller = threading.Event()
    c.caller_cancel = caller
    caller.set()  # cancelled while still waiting
    step, cancelled = sched.plan()
    assert cancelled == [c, b] and b.finish_reason == c.finish_reason == "cancelled"
    assert sched.running == [a] and alloc.free_blocks == 16 - 1


def test_max_batch_bounds_the_running_requests():
    sched = Scheduler(BlockAllocator(num_blocks=100, block_size=32), max_batch=3)
    seqs = [seq(4, 4) for _ in range(5)]
    for s in seqs:
        sched.submit(s)
    step, _ = sched.plan()
    assert sched.running == seqs[:3] and list(sched.waiting) == seqs[3:]


@pytest.mark.parametrize(
    "budget, tokens", [(4096, 4096), ("4096 tokens", 4096), ("1MiB", 2**20 // 1024), ("1.5 GB", int(1.5e9) // 1024)]
)
def test_budgets_in_tokens_or_sizes(budget, tokens):
    from gptq_bridge.engine.kv_cache import CacheShape

    shape = CacheShape(layers=2, kv_heads=4, head_dim=32, dtype=torch.float16)  # 1024 bytes a token
    assert budget_tokens(budget, shape) == tokens


@pytest.mark.parametrize("budget", ["lots", "4 TB", -5, 0, 1.5, True])
def test_a_budget_that_is_not_one_names_itself(budget):
    with pytest.raises(GPTQBridgeError, match=r"kv_cache: "):
        parse_budget(budget)


# --- the forward, against transformers' own ------------------------------------------------------------------


def family_models():
    small = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return {
        "llama": LlamaForCausalLM(LlamaConfig(**small, rope_scaling={"rope_type": "linear", "factor": 2.0})),
        "mistral-window": MistralForCausalLM(MistralConfig(**small, sliding_window=24)),
        "qwen2-bias-tied": Qwen2ForCausalLM(Qwen2Config(**small, tie_word_embeddings=True)),
    }


@pytest.mark.parametrize("name", ["llama", "mistral-window", "qwen2-bias-tied"])
def test_paged_forward_gives_transformers_logits(name):
    model = family_models()[name].eval()
    assert unsupported_reason(model) is None
    cache = PagedKVCache(cache_shape(model, torch.float32), 512, torch.device("cpu"))
    fwd = LlamaFamilyForward(model, cache, max_positions=512)
    ids = torch.randint(0, 101, (2, 80))
    with torch.inference_mode():
        ref = model(ids).logits.float()
    a, b = (
        Sequence(prompt=ids[0, :50].tolist(), max_new_tokens=30, sample=None),
        Sequence(prompt=ids[1, :7].tolist(), max_new_tokens=73, sample=None),
    )
    for s in (a, b):
        s.blocks = cache.allocator.allocate(s.reserve_tokens)
        cache.clear(s.blocks)
    torch.testing.assert_close(fwd.prefill(a, 0, 33), ref[0, 32])  # a prompt read in two chunks
    second, whole = fwd.prefill_many([(a, 33, 50), (b, 0, 7)])  # the rest of it packed with another request's
    torch.testing.assert_close(second, ref[0, 49])
    torch.testing.assert_close(whole, ref[1, 6])
    a.cached, b.cached = 50, 7
    for _ in range(30):  # two requests of different lengths in one batch
        a.append(int(ids[0, a.cached]))
        b.append(int(ids[1, b.cached]))
        logits = fwd.decode([a, b])
        torch.testing.assert_close(logits[0], ref[0, a.cached], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(logits[1], ref[1, b.cached], atol=2e-5, rtol=1e-4)
        a.cached += 1
        b.cached += 1


def test_other_architectures_keep_the_transformers_path():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert "model type 'gpt2' is not one of the engine's families" in unsupported_reason(model)


# --- generating through the engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_path(tmp_path_factory):
    return word_checkpoint(tmp_path_factory.mktemp("word") / "ckpt")


PROMPTS = ["the a of", "to to and in", "is it you that he", "the", "of a", "was for on are with as I"]


@pytest.fixture(params=[False, True], ids=["read-in-step", "overlapped"])
def overlap(request):
    """The engine reads each step's tokens before the next launch, or (as on a GPU) launches the next step
    first and feeds it the tokens on the device."""
    return request.param


def load(word_path, overlap: bool, **kwargs):
    lm = gptq_bridge.load_model(str(word_path), **kwargs)
    engine_for(lm).overlap = overlap
    return lm


def test_greedy_tokens_match_the_eager_path(word_path):
    eager = gptq_bridge.load_model(str(word_path), engine="off")
    engine = gptq_bridge.load_model(str(word_path))
    assert engine_status(eager) is not None and engine_status(engine) is None
    for p in PROMPTS:
        want = eager.generate(p, max_new_tokens=24, ban_eos=True)
        got = engine.generate(p, max_new_tokens=24, ban_eos=True)
        assert got.token_ids == want.token_ids and got.text == want.text and got.finish_reason == "length"
    seeded = dict(max_new_tokens=24, temperature=0.9, top_k=20, repetition_penalty=1.2, seed=7)
    assert engine.generate("the a", **seeded).token_ids == eager.generate("the a", **seeded).token_ids


SAMPLED = [  # per prompt: greedy, or drawn with its own settings and seed
    dict(),
    dict(temperature=0.8, seed=1),
    dict(temperature=1.0, top_k=10, seed=2),
    dict(temperature=1.2, top_p=0.8, min_p=0.05, seed=3),
    dict(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, seed=4),
    dict(temperature=1.0, typical_p=0.7, frequency_penalty=0.3, seed=5),
]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_concurrent_requests_share_the_batch_and_give_the_same_tokens_as_alone(word_path, sampled, overlap):
    lm = load(word_path, overlap)
    settings = dict(zip(PROMPTS, SAMPLED if sampled else [{}] * len(PROMPTS)))
    engine = engine_for(lm)
    fed_before = engine.fed
    alone = {p: lm.generate(p, max_new_tokens=40, ban_eos=True, **settings[p]).token_ids for p in PROMPTS}
    steps_before = engine.steps
    results: dict[str, list[int]] = {}
    start = threading.Barrier(len(PROMPTS))

    def run(p):
        start.wait()
        results[p] = lm.generate(p, max_new_tokens=40, ban_eos=True, **settings[p]).token_ids

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    # batched: far fewer decode steps than one per token of each request
    assert engine.steps - steps_before < len(PROMPTS) * 39
    # overlapped, the steps of rows without penalties take their input tokens on the device
    assert (engine.fed > fed_before) == overlap


def test_cancel_mid_batch_ends_that_request_only(word_path, overlap):
    lm = load(word_path, overlap)
    cancel = threading.Event()
    other: dict = {}
    stream = lm.stream("the a of", max_new_tokens=200, ban_eos=True, cancel=cancel)
    it = iter(stream)
    next(it)
    worker = threading.Thread(
        target=lambda: other.setdefault("r", lm.generate("to to", max_new_tokens=30, ban_eos=True))
    )
    worker.start()
    cancel.set()
    for _ in it:
        pass
    worker.join()
    assert stream.result.finish_reason == "cancelled" and stream.result.usage.completion_tokens < 200
    assert other["r"].finish_reason == "length" and other["r"].usage.completion_tokens == 30
    assert engine_for(lm).forward.cache.allocator.free_blocks == engine_for(lm).forward.cache.allocator.usable_blocks


def test_stop_strings_free_the_slot_and_leaving_a_stream_early_too(word_path, overlap):
    lm = load(word_path, overlap)
    full = lm.generate("the a", max_new_tokens=12, ban_eos=True)
    word = full.text.split()[3]
    stopped = lm.generate("the a", max_new_tokens=12, ban_eos=True, stop=[word])
    assert stopped.finish_reason == "stop" and stopped.text == full.text[: full.text.index(word)]
    with lm.stream("the a", max_new_tokens=100, ban_eos=True) as s:
        next(iter(s))
    alloc = engine_for(lm).forward.cache.allocator
    for _ in range(200):  # the engine frees the slot at its next step
        if alloc.free_blocks == alloc.usable_blocks:
            break
        threading.Event().wait(0.01)
    assert alloc.free_blocks == alloc.usable_blocks


def test_an_end_token_ends_the_request_where_it_is_drawn_with_or_without_overlap(word_path, overlap):
    """With overlap the step after an end token is already launched: its row is dropped, nothing leaks."""
    lm = load(word_path, overlap)
    engine = engine_for(lm)
    free = engine.forward.cache.allocator.usable_blocks

    def run(prompt: str, end_ids=frozenset(), new=30) -> tuple[list[int], str]:
        items, done = [], threading.Event()
        seq = Sequence(
            prompt=lm.tokenizer(prompt)["input_ids"],
            max_new_tokens=new,
            sample=lambda logits, s: int(logits.argmax()),
            greedy=True,
            end_ids=end_ids,
            deliver=lambda item: (items.append(item), isinstance(item, End) and done.set()),
        )
        engine.submit(seq)
        assert done.wait(60)
        return [t for t in items if isinstance(t, int)], items[-1].reason

    full, reason = run("the a of")
    assert reason == "length" and len(full) == 30
    end = full[7]  # the first time it is drawn ends the request
    cut = full.index(end)
    short, reason = run("the a of", frozenset({end}))
    assert short == full[: cut + 1] and reason == "eos"
    # beside a longer request, which goes on unchanged
    results = {}
    threads = [
        threading.Thread(target=lambda: results.setdefault("short", run("the a of", frozenset({end})))),
        threading.Thread(target=lambda: results.setdefault("long", run("to to and in", new=40))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["short"] == (short, "eos")
    assert results["long"] == run("to to and in", new=40)
    assert engine.forward.cache.allocator.free_blocks == free and all(not s.pending for s in engine.scheduler.running)


def test_a_request_larger_than_the_cache_fails_at_the_call_and_one_that_fits_later_waits(word_path):
    lm = gptq_bridge.load_model(str(word_path), kv_cache=128)  # 4 blocks of 32
    with pytest.raises(GPTQBridgeError, match=r"kv_cache: this request needs 203 tokens .*holds 128"):
        lm.generate("the a of", max_new_tokens=200)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(lm.generate("the a of", max_new_tokens=80, ban_eos=True)))
        for _ in range(3)
    ]  # 83 tokens: 3 blocks each, so one runs at a time
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.usage.completion_tokens for r in results] == [80, 80, 80]
    assert len({tuple(r.token_ids) for r in results}) == 1


def test_closing_the_engine_cancels_what_runs_and_it_works_again(word_path, overlap):
    lm = load(word_path, overlap)
    stream = lm.stream("the a of", max_new_tokens=200, ban_eos=True)
    it = iter(stream)
    next(it)
    engine = engine_for(lm)
    engine.close()
    for _ in it:
        pass
    assert stream.result.finish_reason == "cancelled" and engine._worker is None
    assert lm.generate("the a", max_new_tokens=5, ban_eos=True).usage.completion_tokens == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [({"engine": "fast"}, "engine: 'fast' is not one of"), ({"kv_cache": "big"}, "kv_cache: 'big' is not a budget")],
)
def test_engine_options_are_checked_at_load(word_path, kwargs, message):
    with pytest.raises(GPTQBridgeError, match=message):
        gptq_bridge.load_model(str(word_path), **kwargs)


# --- the fused steps between GEMMs (Triton; on a CPU machine they run in triton's interpreter) -----------


def test_fused_ops_match_the_torch_ops():
    pytest.importorskip("triton")
    from gptq_bridge.engine.fused_ops import TorchOps, TritonOps

    torch.manual_seed(0)
    n, hidden, heads, kv, dim = 3, 96, 4, 2, 16
    h = torch.randn(n, hidden, dtype=torch.float16)
    delta = torch.randn(n, hidden, dtype=torch.float16)
    weight = torch.rand(hidden, dtype=torch.float16) + 0.5
    want_h, want_x = TorchOps.add_rms_norm(h.clone(), delta, weight, 1e-5)
    got_h, got_x = TritonOps.add_rms_norm(h.clone(), delta, weight, 1e-5)
    torch.testing.assert_close(got_h, want_h, atol=0, rtol=0)
    torch.testing.assert_close(got_x, want_x, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(
        TritonOps.add_rms_norm(h.clone(), None, weight, 1e-5)[1],
        TorchOps.add_rms_norm(h.clone(), None, weight, 1e-5)[1],
        atol=2e-3,
        rtol=2e-3,
    )
    order = torch.randperm(hidden)  # the next layer's rows in group order (act_order.py): the norm writes in it
    for d in (delta, None):
        want_h, want_x = TorchOps.add_rms_norm(h.clone(), d, weight, 1e-5)
        got_h, got_x = TritonOps.add_rms_norm(h.clone(), d, weight, 1e-5, order)
        torch.testing.assert_close(got_h, want_h, atol=0, rtol=0)  # the residual added once, in its own order
        torch.testing.assert_close(got_x, want_x[:, order], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(TorchOps.add_rms_norm(h.clone(), d, weight, 1e-5, order)[1], want_x[:, order])

    fused = torch.randn(n, (heads + 2 * kv) * dim, dtype=torch.float16)  # q, k, v as slices of one output
    q, k, v = (t.view(n, -1, dim) for t in fused.split([heads * dim, kv * dim, kv * dim], dim=1))
    angles = torch.rand(n, dim // 2) * 6
    cos = torch.cat([angles.cos()] * 2, dim=1).half()
    sin = torch.cat([angles.sin()] * 2, dim=1).half()
    write = torch.tensor([5, 0, 9])
    caches = [torch.zeros(12, kv, dim, dtype=torch.float16) for _ in range(4)]
    want_q = TorchOps.rope_store(q.clone(), k, v, cos, sin, write, caches[0], caches[1])
    got_q = TritonOps.rope_store(q.clone(), k, v, cos, sin, write, caches[2], caches[3])
    torch.testing.assert_close(got_q, want_q, atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(caches[2], caches[0], atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(caches[3], caches[1], atol=0, rtol=0)

    gate_up = torch.randn(n, 2 * 1500, dtype=torch.float16)
    gate, up = gate_up.split(1500, dim=1)
    torch.testing.assert_close(TritonOps.silu_mul(gate, up), TorchOps.silu_mul(gate, up), atol=2e-3, rtol=2e-3)


# --- a decode step's inputs and its greedy draw --------------------------------------------------------------


def test_a_steps_integer_inputs_travel_packed_in_one_buffer():
    from gptq_bridge.engine.forward import decode_inputs
    from gptq_bridge.engine.graphs import pack, unpack

    a, b = seq(40, 8), seq(5, 100)
    a.blocks, b.blocks, a.cached, b.cached = [3, 4], [7, 8, 9, 10], 40, 5
    host = decode_inputs([a, b], 32, rows=4, table_width=6)
    packed = pack(host)
    assert packed.dtype == torch.uint8 and packed.numel() == sum(t.numel() * t.element_size() for t in host)
    for view, want in zip(unpack(packed.clone(), host), host):
        assert view.dtype == want.dtype and torch.equal(view, want)


def test_greedy_draw_applies_each_rows_bans():
    from gptq_bridge.engine.engine import greedy_draw

    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0], [3.0, 5.0, 0.0, 4.0]])
    rows = [seq(3, 4), seq(3, 4)]
    assert greedy_draw(logits, rows).tolist() == [1, 1]
    rows[0].banned = rows[1].banned = [1]
    cache: dict = {}
    assert greedy_draw(logits, rows, cache).tolist() == [2, 3] and list(cache) == [(1,)]  # one list for all
    rows[1].banned = [1, 3]
    assert greedy_draw(logits, rows, cache).tolist() == [2, 0]  # each row its own
