"""LangChain: `GPTQLLM` (a text-completion `LLM`) and `ChatGPTQ` (a `BaseChatModel`).

    from gptq_bridge.adapters.langchain import ChatGPTQ
    chat = ChatGPTQ(max_tokens=64)                # the embedded default model
    chat.invoke("What is the capital of Japan?")

Parameters carry LangChain's standard names (`temperature`, `max_tokens`, `top_p`, `stop`, ...) and map onto
gptq-bridge's generator. Models come from the process-wide cache, so several LangChain objects (and other
adapters) naming one checkpoint share it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import LLM, BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
from pydantic import BaseModel, ConfigDict, Field

from ..errors import GPTQBridgeError
from ..types import ChatMessage, GenerationResult
from .common import model_display_name, shared_model

ROLES = {"system": "system", "human": "user", "user": "user", "ai": "assistant", "assistant": "assistant"}


class GPTQParams(BaseModel):
    """Fields shared by the LLM and the chat model (LangChain's standard names)."""

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())

    model: str | None = Field(
        default=None, description="GPTQ source: directory or org/name[:branch]; None = default model"
    )
    kernel: str = "auto"
    device: str | None = None
    temperature: float = 0.0
    max_tokens: int | None = None  # None: the generator's default (adapted to the context)
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    prompt_format: str | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="other gptq-bridge generation parameters")

    def _loaded(self):
        return shared_model(self.model, kernel=self.kernel, device=self.device)

    def _generation_kwargs(self, stop: list[str] | None, call_kwargs: dict[str, Any], chat: bool) -> dict[str, Any]:
        params = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            **self.model_kwargs,
        }
        if self.max_tokens is not None:
            params["max_new_tokens"] = self.max_tokens
        if "max_tokens" in call_kwargs:
            call_kwargs["max_new_tokens"] = call_kwargs.pop("max_tokens")
        params.update(call_kwargs)
        params["stop"] = list(dict.fromkeys((self.stop or []) + (stop or []) + list(params.get("stop") or [])))
        if chat and self.prompt_format and "prompt_format" not in params:  # completions are sent as they are
            params["prompt_format"] = self.prompt_format
        return params

    def _ls_params(self, model_type: str, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """LangSmith's standard tracing parameters (no model load: tracing must stay cheap)."""
        return {
            "ls_provider": "gptq_bridge",
            "ls_model_name": kwargs.get("model") or self.model or "default",
            "ls_model_type": model_type,
            "ls_temperature": kwargs.get("temperature", self.temperature),
            "ls_max_tokens": kwargs.get("max_tokens", self.max_tokens),
            "ls_stop": stop or self.stop or None,
        }

    def _count_tokens(self, text: str) -> int:
        tokenizer = self._loaded().tokenizer
        if tokenizer is None:
            raise GPTQBridgeError("this checkpoint ships no tokenizer, so tokens cannot be counted")
        return len(tokenizer.encode(text, add_special_tokens=False))


def to_chat_messages(messages: list[BaseMessage]) -> list[ChatMessage]:
    """LangChain messages to gptq-bridge's (text only; tool and multimodal messages are refused by name)."""
    out = []
    for m in messages:
        role = ROLES.get(m.type)
        if role is None:
            raise GPTQBridgeError(f"{type(m).__name__} messages are not supported (tool calling is off)")
        if isinstance(m.content, str):
            text = m.content
        else:
            parts = []
            for block in m.content:
                if isinstance(block, str):
                    parts.append(block)
                elif isinstance(block, dict) and block.get("type") == "text":
                    parts.append(block.get("text", ""))
                else:
                    kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                    raise GPTQBridgeError(f"message content of type {kind!r} is not supported (text only)")
            text = "".join(parts)
        out.append(ChatMessage(role=role, content=text))
    return out


def _usage(result: GenerationResult) -> UsageMetadata:
    u = result.usage
    return UsageMetadata(
        input_tokens=u.prompt_tokens,
        output_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
    )


class GPTQLLM(GPTQParams, LLM):
    """A GPTQ checkpoint as a LangChain text-completion LLM: the prompt is sent as it is."""

    @property
    def _llm_type(self) -> str:
        return "gptq-bridge"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "kernel": self.kernel,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return "".join(chunk.text for chunk in self._stream(prompt, stop, run_manager, **kwargs))

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        with self._loaded().stream(prompt, **self._generation_kwargs(stop, kwargs, chat=False)) as stream:
            for piece in stream:
                if not piece.text:
                    continue
                chunk = GenerationChunk(text=piece.text)
                if run_manager:
                    run_manager.on_llm_new_token(piece.text, chunk=chunk)
                yield chunk
            result = stream.result
        yield GenerationChunk(
            text="", generation_info={"finish_reason": result.finish_reason, "usage": result.usage.model_dump()}
        )

    def get_num_tokens(self, text: str) -> int:
        return self._count_tokens(text)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        return self._ls_params("llm", stop, kwargs)


class ChatGPTQ(GPTQParams, BaseChatModel):
    """A GPTQ checkpoint as a LangChain chat model; messages go through the model's prompt format."""

    @property
    def _llm_type(self) -> str:
        return "gptq-bridge-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "kernel": self.kernel,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        merged: AIMessageChunk | None = None
        for chunk in self._stream(messages, stop, run_manager, **kwargs):
            merged = chunk.message if merged is None else merged + chunk.message
        message = AIMessage(
            content=merged.content,
            usage_metadata=merged.usage_metadata,
            response_metadata=merged.response_metadata,
            id=merged.id,
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        loaded = self._loaded()
        with loaded.stream(to_chat_messages(messages), **self._generation_kwargs(stop, kwargs, chat=True)) as stream:
            for piece in stream:
                if not piece.text:
                    continue
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece.text))
                if run_manager:
                    run_manager.on_llm_new_token(piece.text, chunk=chunk)
                yield chunk
            result = stream.result
        metadata = {
            "model_name": model_display_name(loaded),
            "finish_reason": result.finish_reason,
            "stop_string": result.stop_string,
            "kernel": loaded.kernel,
        }
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="", usage_metadata=_usage(result), response_metadata=metadata, chunk_position="last"
            )
        )

    def get_num_tokens(self, text: str) -> int:
        return self._count_tokens(text)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        return self._ls_params("chat", stop, kwargs)
