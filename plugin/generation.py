"""The built-in generator: a `GenerationRequest` on a `LoadedModel` to a stream of chunks and a result.

One forward over the prompt fills a KV cache (transformers' DynamicCache); each new token then costs one
forward of one position. Sampling lives in sampling.py, stop strings and hold-back in stopping.py, prompt
formats in prompts.py; this module ties them together:

    prompt text (or messages rendered by a format) → token ids (BOS as asked, truncated to the context)
    → prefill → [sample → decode incrementally → stop strings → chunk] per token → result

Calls on one model are serialised by the model's `generation_lock`; the cache belongs to the call, so a
cancelled or abandoned generation leaves nothing behind. Cancellation is checked before every forward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import GPTQBridgeError
from .hookspecs import hookimpl
from .reply import Reply
from .sampling import Sampler
from .types import GenerationChunk, GenerationRequest, GenerationResult

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole UTF-8 character


# --- incremental decoding ------------------------------------------------------------------------------------


def backend_decoder(tokenizer):
    """The `tokenizers` library object behind a fast tokenizer whose class changes nothing in decoding: its
    `decode` gives the same text as the tokenizer's without cleaning up spaces, for a third of the host time
    (twice per streamed token). None for any other tokenizer."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    cls = type(tokenizer)
    plain = (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls._decode is PreTrainedTokenizerFast._decode
        and cls.decode is PreTrainedTokenizerFast.decode
    )
    return getattr(tokenizer, "_tokenizer", None) if plain else None


class IncrementalDecoder:
    """Token ids in, text out, never half a character.

    Each step decodes a short window twice: from the token before the last released one, without and with the
    new tokens; the difference is the new text. Decoding from one token back keeps the space a tokenizer puts
    (or strips) at a word's start right. A difference ending in U+FFFD is an incomplete UTF-8 sequence (byte
    tokens): it waits for the next token.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # end of what has been released
        self._backend = backend_decoder(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def _delta(self) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        return after[len(before) :] if len(after) > len(before) else ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        delta = self._delta()
        if not delta or delta.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def flush(self) -> str:
        """Whatever is still waiting (an incomplete character at the very end shows as U+FFFD)."""
        delta = self._delta()
        self.prefix = self.read = len(self.ids)
        return delta


# --- preparing a request --------------------------------------------------------------------------------------


@dataclass
class Prepared:
    ids: list[int]
    truncated: int
    stops: list[str]
    stop_token_ids: dict[int, str]
    eos_ids: set[int]
    prompt_format: str | None
    context_length: int | None
    vocab_size: int
    max_new_tokens: int  # the request's, or less when it was left at its default and the context is short


def eos_token_ids(model) -> set[int]:
    """EOS ids from the tokenizer, the model config and the generation config (chat models often add one)."""
    found: set[int] = set()
    sources = [
        getattr(model.tokenizer, "eos_token_id", None),
        getattr(getattr(model.model, "config", None), "eos_token_id", None),
        getattr(getattr(model.model, "generation_config", None), "eos_token_id", None),
    ]
    for value in sources:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, int))
    return found


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == bos


def encode_prompt(tokenizer, text: str, add_bos: bool | None) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is None:
        raise GPTQBridgeError("add_bos: this model's tokenizer has no BOS token")
    want = tokenizer_adds_bos(tokenizer) if add_bos is None else add_bos
    if want and ids[:1] != [bos]:
        ids.insert(0, bos)
    if not ids:
        if bos is None:
            raise GPTQBridgeError("prompt: it is empty, and this tokenizer has no BOS token to start from")
        ids = [bos]
    return ids


def model_context_length(model) -> int | None:
    config = getattr(model.model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prepare(model, request: GenerationRequest) -> Prepared:
    from .prompts import choose_prompt_format, registered_prompt_formats, render_messages

    tok = model.tokenizer
    if tok is None:
        raise GPTQBridgeError(f"{model.source.text}: this checkpoint ships no tokenizer, so it cannot generate text")
    params = request.params
    stops = list(params.stop)
    fmt_name = None
    if request.messages is not None:
        formats = registered_prompt_formats()
        choice = choose_prompt_format(tok, model.source, request.prompt_format or model.prompt_format, formats)
        rendered = render_messages(request.messages, choice.name, tokenizer=tok, input=request.input, formats=formats)
        text, fmt_name = rendered.text, rendered.format
        stops += [s for s in rendered.stop if s not in stops]
    else:
        if request.prompt_format or request.input:
            field = "prompt_format" if request.prompt_format else "input"
            raise GPTQBridgeError(f"{field}: applies to messages; a prompt string is sent as it is")
        text = request.prompt
    bos_text = getattr(tok, "bos_token", None)
    add_bos = params.add_bos
    if add_bos is not False and bos_text and fmt_name is not None and text.startswith(bos_text):
        add_bos = False  # the format already wrote it
    ids = encode_prompt(tok, text, add_bos)

    ctx = model_context_length(model)
    if request.context_length is not None:
        ctx = request.context_length if ctx is None else min(ctx, request.context_length)
    truncated = 0
    max_new = params.max_new_tokens
    if ctx is not None:
        if "max_new_tokens" not in params.model_fields_set:
            max_new = min(max_new, max(ctx // 2, 1))  # the default must not fill a short context
        elif max_new >= ctx:
            raise GPTQBridgeError(f"max_new_tokens: {max_new} leaves no room for the prompt in a {ctx}-token context")
        budget = ctx - max_new
        if len(ids) > budget:
            if request.truncate == "error":
                raise GPTQBridgeError(
                    f"prompt: {len(ids)} tokens, but only {budget} fit ({ctx}-token context minus "
                    f"max_new_tokens={max_new}); pass truncate='left' to cut it"
                )
            truncated = len(ids) - budget
            keep_bos = ids[0] == getattr(tok, "bos_token_id", None) and budget > 1
            ids = ([ids[0]] + ids[truncated + 1 :]) if keep_bos else ids[truncated:]

    # stop strings that are special tokens are matched as tokens: skip_special_tokens hides them from the text
    added = {}
    try:
        added = tok.get_added_vocab()
    except Exception:  # not every tokenizer class has it
        pass
    stop_token_ids = {added[s]: s for s in stops if s in added}
    vocab = getattr(getattr(model.model, "config", None), "vocab_size", None) or len(tok)
    return Prepared(
        ids=ids,
        truncated=truncated,
        stops=stops,
        stop_token_ids=stop_token_ids,
        eos_ids=eos_token_ids(model),
        prompt_format=fmt_name,
        context_length=ctx,
        vocab_size=vocab,
        max_new_tokens=max_new,
    )


# --- the forward pass ----------------------------------------------------------------------------------------


@functools.cache
def _cache_argument(model_type: type) -> str:
    """transformers 5 renamed `past_key_values` to `cache`; use whichever this model's forward takes."""
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(hf_model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=hf_model.config)
    except TypeError:
        return DynamicCache()


def attention_backends(device: torch.device):
    """On CUDA, keep scaled_dot_product_attention off the cuDNN backend: it costs ~10 ms of host time per call
    when the sequence length changes, i.e. at every decode step (docs/TRAPS: measured on the H100)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


PREFILL_CHUNK = 512  # prompt tokens per forward: bounds activation memory and lets a cancel in between


class Decoder:
    """The model plus one call's KV cache: `prefill(ids)` then `step(token)`, each giving the next logits."""

    def __init__(self, hf_model, device: torch.device):
        self.model = hf_model
        self.device = device
        self.cache = new_cache(hf_model)
        self.arg = _cache_argument(type(hf_model))

    def _forward(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode(), attention_backends(self.device):
            out = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **{self.arg: self.cache})
        return out.logits[0, -1].float()

    def prefill(self, ids: list[int], cancelled=lambda: False) -> torch.Tensor | None:
        """Logits after the prompt; None when cancelled between chunks."""
        for start in range(0, len(ids), PREFILL_CHUNK):
            if start and cancelled():
                return None
            logits = self._forward(ids[start : start + PREFILL_CHUNK])
        return logits

    def step(self, token: int) -> torch.Tensor:
        return self._forward([token])


# --- the generator --------------------------------------------------------------------------------------------


def _acquire(lock: threading.Lock, cancel: threading.Event | None) -> bool:
    """Wait for the model; give up (False) if cancelled while waiting."""
    while not lock.acquire(timeout=0.05):
        if cancel is not None and cancel.is_set():
            return False
    return True


def random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


@dataclass
class Generation:
    """One request ready to generate: what `prepare` found, its sampler, and the reply its tokens go to."""

    prep: Prepared
    sampler: Sampler
    reply: Reply
    fields: dict  # the result's fields that generation does not change

    def result(self) -> GenerationResult:
        return self.reply.result(len(self.prep.ids), **self.fields)


def begin(model, request: GenerationRequest) -> Generation:
    """Validate and prepare a request (errors surface here, at the call); shared by every built-in generator."""
    prep = prepare(model, request)
    params = request.params
    seed = params.seed if params.seed is not None else random_seed()
    reply = Reply(
        IncrementalDecoder(model.tokenizer, params.skip_special_tokens), prep.stops, prep.stop_token_ids, prep.eos_ids
    )
    fields = dict(prompt_format=prep.prompt_format, seed=seed, truncated_prompt_tokens=prep.truncated)
    return Generation(prep, Sampler(params, prep.vocab_size, prep.eos_ids, seed), reply, fields)


def run(
    model, request: GenerationRequest, cancel: threading.Event | None = None
) -> Iterator[GenerationChunk | GenerationResult]:
    """Prepare now, generate lazily as the iterator is consumed."""
    return _generate(model, begin(model, request), cancel)


def _generate(model, gen: Generation, cancel: threading.Event | None) -> Iterator[GenerationChunk | GenerationResult]:
    prep, reply = gen.prep, gen.reply
    cancelled = cancel.is_set if cancel is not None else (lambda: False)
    if not _acquire(model.generation_lock, cancel):
        reply.close("cancelled")
        yield gen.result()
        return
    try:
        context = torch.empty(len(prep.ids) + prep.max_new_tokens, dtype=torch.long)
        context[: len(prep.ids)] = torch.tensor(prep.ids)
        n = len(prep.ids)
        finish = "length"
        if cancelled():
            finish = "cancelled"
        else:
            net = Decoder(model.model, model.device.torch_device)
            logits = net.prefill(prep.ids, cancelled)
            if logits is None:
                finish = "cancelled"
            for step in range(prep.max_new_tokens if logits is not None else 0):
                token = gen.sampler(logits, context[:n])
                context[n] = token
                n += 1
                chunk = reply.add(token)
                if chunk is not None:
                    yield chunk
                if reply.finish is not None or step == prep.max_new_tokens - 1:
                    break
                if cancelled():
                    finish = "cancelled"
                    break
                logits = net.step(token)
        tail = reply.close(finish)  # ended by length, EOS, a stop or a cancel: release what was held
        if tail is not None:
            yield tail
        final = gen.result()
    finally:
        model.generation_lock.release()
    yield final  # after releasing the model: a caller holding on to a finished stream blocks nobody


@hookimpl(trylast=True)
def gptq_generate(model, request, cancel):
    return run(model, request, cancel)
