"""LlamaIndex: `GPTQLLM`, a `llama_index.core.llms.LLM` over a GPTQ checkpoint.

    from llama_index.core import Settings
    from gptq_bridge.adapters.llamaindex import GPTQLLM
    Settings.llm = GPTQLLM(max_new_tokens=128)     # the embedded default model

Chat goes through the model's prompt format (its chat template, or the format gptq-bridge picks for it);
`complete` sends the prompt as it is. Async methods run generation in a worker thread, so the event loop keeps
serving while tokens are produced.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage as LIChatMessage,
)
from llama_index.core.base.llms.types import (
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.llms import LLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from pydantic import Field, PrivateAttr

from ..errors import GPTQBridgeError
from ..generation import model_context_length
from ..types import ChatMessage
from .common import iterate_in_thread, model_display_name, shared_model

ROLES = {MessageRole.SYSTEM: "system", MessageRole.USER: "user", MessageRole.ASSISTANT: "assistant"}


def to_chat_messages(messages: Sequence[LIChatMessage]) -> list[ChatMessage]:
    out = []
    for m in messages:
        role = ROLES.get(m.role)
        if role is None:
            raise GPTQBridgeError(f"chat messages with role {m.role.value!r} are not supported (tool calling is off)")
        out.append(ChatMessage(role=role, content=m.content or ""))
    return out


class GPTQLLM(LLM):
    """A GPTQ checkpoint as a LlamaIndex LLM (a chat model: `is_chat_model` is true)."""

    model: str | None = Field(
        default=None, description="GPTQ source: directory or org/name[:branch]; None = default model"
    )
    kernel: str = Field(default="auto", description="kernel name, or auto")
    device: str | None = Field(default=None, description="cpu, cuda or cuda:N; None = cuda if present")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy")
    max_new_tokens: int = Field(default=256, gt=0, description="tokens to generate at most")
    context_window: int | None = Field(default=None, description="None = the model's own context length")
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = Field(default_factory=list)
    prompt_format: str | None = None
    generate_kwargs: dict[str, Any] = Field(default_factory=dict, description="other gptq-bridge generation parameters")
    _name: str | None = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "GPTQBridgeLLM"

    def _loaded(self):
        return shared_model(self.model, kernel=self.kernel, device=self.device)

    @property
    def metadata(self) -> LLMMetadata:
        loaded = self._loaded()
        window = self.context_window or model_context_length(loaded.model) or 2048
        return LLMMetadata(
            context_window=window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            model_name=model_display_name(loaded),
        )

    def _kwargs(self, kwargs: dict[str, Any], chat: bool) -> dict[str, Any]:
        params = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            **self.generate_kwargs,
        }
        kwargs = {k: v for k, v in kwargs.items() if k != "formatted"}
        params.update(kwargs)
        params["stop"] = list(dict.fromkeys(self.stop + list(params.get("stop") or [])))
        if chat and self.prompt_format and "prompt_format" not in params:  # completions are sent as they are
            params["prompt_format"] = self.prompt_format
        if self.context_window and "context_length" not in params:
            params["context_length"] = self.context_window
        return params

    def _chat_stream(self, messages: Sequence[LIChatMessage], kwargs: dict[str, Any]):
        return self._loaded().stream(to_chat_messages(messages), **self._kwargs(kwargs, chat=True))

    def _complete_stream(self, prompt: str, kwargs: dict[str, Any]):
        return self._loaded().stream(prompt, **self._kwargs(kwargs, chat=False))

    @staticmethod
    def _raw(result) -> dict[str, Any]:
        return {
            "finish_reason": result.finish_reason,
            "stop_string": result.stop_string,
            "usage": result.usage.model_dump(),
        }

    # --- sync -----------------------------------------------------------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        with self._complete_stream(prompt, kwargs) as s:
            result = s.consume()
        return CompletionResponse(text=result.text, raw=self._raw(result))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        def gen():
            with self._complete_stream(prompt, kwargs) as s:
                for chunk in s:
                    yield CompletionResponse(text=chunk.full_text, delta=chunk.text)

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[LIChatMessage], **kwargs: Any) -> ChatResponse:
        with self._chat_stream(messages, kwargs) as s:
            result = s.consume()
        return ChatResponse(
            message=LIChatMessage(role=MessageRole.ASSISTANT, content=result.text), raw=self._raw(result)
        )

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[LIChatMessage], **kwargs: Any) -> ChatResponseGen:
        def gen():
            with self._chat_stream(messages, kwargs) as s:
                for chunk in s:
                    yield ChatResponse(
                        message=LIChatMessage(role=MessageRole.ASSISTANT, content=chunk.full_text), delta=chunk.text
                    )

        return gen()

    # --- async: generation runs in a worker thread ----------------------------------------------------------

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self.complete, prompt, formatted, **kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[LIChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        async def gen():
            async for chunk in iterate_in_thread(lambda: self._complete_stream(prompt, kwargs)):
                yield CompletionResponse(text=chunk.full_text, delta=chunk.text)

        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[LIChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        async def gen():
            async for chunk in iterate_in_thread(lambda: self._chat_stream(messages, kwargs)):
                yield ChatResponse(
                    message=LIChatMessage(role=MessageRole.ASSISTANT, content=chunk.full_text), delta=chunk.text
                )

        return gen()
