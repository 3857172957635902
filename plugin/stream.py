"""The caller's side of the `gptq_generate` hook: a request built from what a caller has, and the stream.

`LoadedModel.stream` builds a `GenerationRequest` (`make_request`, with errors that name the parameter) and
returns a `GenerationStream`, which asks the generator plugins for an iterator and hands out its chunks. The
built-in generator itself lives in generation.py; this module does not know which plugin generates.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from .errors import GPTQBridgeError
from .plugins import get_plugin_manager
from .types import GenerationChunk, GenerationParams, GenerationRequest, GenerationResult


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err["loc"] if x != "params"]
        name = ".".join(loc) or "request"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(f"{name}: unknown parameter")
        else:
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            parts.append(f"{name}: {msg}{got}")
    return "; ".join(parts)


def make_params(**kwargs: Any) -> GenerationParams:
    try:
        return GenerationParams(**kwargs)
    except ValidationError as exc:
        raise GPTQBridgeError(validation_message(exc)) from None


def make_request(
    prompt: str | list | GenerationRequest | None = None,
    *,
    messages: list | None = None,
    params: GenerationParams | dict | None = None,
    **kwargs: Any,
) -> GenerationRequest:
    """A request from what a caller naturally has: a string, a list of messages (dicts or ChatMessage), or a
    request; request fields (`prompt_format`, `input`, `truncate`, `context_length`) and sampling parameters
    as keywords. Unknown names are errors that name them."""
    if isinstance(prompt, GenerationRequest):
        if messages is not None or params is not None or kwargs:
            raise GPTQBridgeError("pass either a GenerationRequest or prompt and parameters, not both")
        return prompt
    if isinstance(prompt, (list, tuple)):
        if messages is not None:
            raise GPTQBridgeError("give messages once: as the first argument or as messages=, not both")
        prompt, messages = None, list(prompt)
    request_fields = {k: kwargs.pop(k) for k in ("prompt_format", "input", "truncate", "context_length") if k in kwargs}
    if isinstance(params, GenerationParams):
        base = params.model_dump(exclude_unset=True)
    else:
        base = dict(params or {})
    base.update(kwargs)
    try:
        return GenerationRequest(prompt=prompt, messages=messages, params=GenerationParams(**base), **request_fields)
    except ValidationError as exc:
        raise GPTQBridgeError(validation_message(exc)) from None


class GenerationStream:
    """Iterate for `GenerationChunk`s (each with the new text and the full text so far); afterwards `result`
    holds the `GenerationResult`. `cancel()` may be called from any thread; `close()` (or leaving a `with`
    block) stops generation and frees the model for the next call."""

    def __init__(self, model, request: GenerationRequest, cancel: threading.Event | None = None):
        self.request = request
        self.cancel_event = cancel if cancel is not None else threading.Event()
        items = get_plugin_manager().hook.gptq_generate(model=model, request=request, cancel=self.cancel_event)
        if items is None:
            raise GPTQBridgeError(f"{model.source.text}: no generator plugin accepted this request")
        self._items = iter(items)
        self.result: GenerationResult | None = None
        self.text = ""

    def __iter__(self) -> Iterator[GenerationChunk]:
        try:
            for item in self._items:
                if isinstance(item, GenerationResult):
                    self.result = item
                    self.text = item.text
                    return
                self.text = item.full_text
                yield item
        finally:
            if self.result is None:  # the caller stopped iterating: end generation, free the model
                self.close()

    def cancel(self) -> None:
        self.cancel_event.set()

    def close(self) -> None:
        close = getattr(self._items, "close", None)
        if close is not None:
            close()

    def consume(self) -> GenerationResult:
        for _ in self:
            pass
        if self.result is None:
            raise GPTQBridgeError("the generator ended without a result")
        return self.result

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
