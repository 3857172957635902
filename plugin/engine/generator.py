"""The engine as a generator plugin: Llama-family models generate through it, others fall through.

The caller's thread prepares the request (prompt, stops, sampler) exactly as the eager generator does, then
hands a `Sequence` to the model's engine and turns the tokens it receives into chunks (reply.py). Several
callers share the engine's batch; none waits for another to finish.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ..hookspecs import hookimpl
from ..sampling import Sampler
from ..types import GenerationChunk, GenerationRequest, GenerationResult
from .engine import Engine
from .forward import LlamaFamilyForward, cache_shape, unsupported_reason
from .kv_cache import PagedKVCache, budget_tokens
from .scheduler import End, Sequence

if TYPE_CHECKING:
    from ..generation import Generation

_CREATE = threading.Lock()


def engine_for(model) -> Engine | None:
    """The model's engine, made on first use; None when the model does not run in the engine (see `engine_status`)."""
    if engine_status(model) is not None:
        return None
    engine = model.decode_engine
    if engine is None:
        with _CREATE:
            engine = model.decode_engine
            if engine is None:
                engine = model.decode_engine = build_engine(model)
    return engine


def engine_status(model) -> str | None:
    """Why `model` generates with the eager transformers path instead of the engine (None: it uses the engine)."""
    if getattr(model, "engine", "auto") == "off":
        return "the engine is turned off for this model (engine='off')"
    return unsupported_reason(model.model)


def default_budget(model, context: int) -> int:
    """KV-cache tokens when the user sets none: on a GPU, half the memory left after loading (at most 32
    contexts); on the CPU, four contexts (pages are touched only as requests use them)."""
    shape = cache_shape(model.model, model.dtype)
    device = model.device.torch_device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(min(free // 2 // shape.bytes_per_token, 32 * context), 256)
    return 4 * context


def build_engine(model) -> Engine:
    from ..generation import model_context_length

    context = model_context_length(model) or 4096
    shape = cache_shape(model.model, model.dtype)
    budget = getattr(model, "kv_cache", None)
    tokens = budget_tokens(budget, shape) if budget is not None else default_budget(model, context)
    placement = getattr(model, "placement", None)
    if placement is None:
        cache = PagedKVCache(shape, tokens, model.device.torch_device)
    else:  # split across devices: each layer's cache beside it
        cache = PagedKVCache(shape, tokens, [torch.device(placement.layer_device(i)) for i in range(shape.layers)])
    forward = LlamaFamilyForward(model.model, cache, max_positions=min(context, tokens + 1), placement=placement)
    return Engine(forward)


def batch_greedy(sampler: Sampler) -> bool:
    """Greedy with no penalties: the engine picks such rows of a batch together (bans included)."""
    p = sampler.params
    return (
        p.temperature == 0.0
        and p.repetition_penalty == 1.0
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
    )


def run(
    model, engine: Engine, request: GenerationRequest, cancel: threading.Event | None
) -> Iterator[GenerationChunk | GenerationResult]:
    """Validate and prepare now (errors surface at the call), generate once the iterator is consumed."""
    from ..generation import begin

    gen = begin(model, request)
    items: queue.SimpleQueue = queue.SimpleQueue()
    prep, sampler = gen.prep, gen.sampler
    seq = Sequence(
        prompt=prep.ids,
        max_new_tokens=prep.max_new_tokens,
        sample=lambda logits, s: sampler(logits, s.context[: s.length]),
        sampler=sampler,
        end_ids=frozenset(prep.eos_ids) | frozenset(prep.stop_token_ids),
        greedy=batch_greedy(sampler),
        banned=sampler.banned.tolist(),
        caller_cancel=cancel,
        deliver=items.put,
    )
    engine.scheduler.check(seq)
    return _stream(engine, seq, items, gen)


def _stream(
    engine: Engine, seq: Sequence, items: queue.SimpleQueue, gen: Generation
) -> Iterator[GenerationChunk | GenerationResult]:
    reply = gen.reply
    engine.submit(seq)
    ended = "length"
    try:
        while reply.finish is None:
            item = items.get()
            if isinstance(item, End):
                if item.error is not None:
                    raise item.error
                ended = item.reason
                break
            chunk = reply.add(item)
            if chunk is not None:
                yield chunk
        tail = reply.close(ended)
        if tail is not None:
            yield tail
    finally:
        seq.cancel.set()  # ended here (a stop string, or the caller stopped iterating): free its slot now
        engine.wake()
    yield gen.result()


@hookimpl
def gptq_generate(model, request, cancel):
    engine = engine_for(model)
    return None if engine is None else run(model, engine, request, cancel)
