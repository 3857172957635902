"""What `load_model` returns: the running model and everything known about how it was loaded."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import ConfigFile, QuantizeConfig
from .placement import Placement
from .stream import GenerationStream, make_request
from .types import DeviceInfo, GenerationResult, KernelChoice, ResolvedSource


@dataclass
class LoadedModel:
    model: torch.nn.Module  # callable as model(input_ids).logits
    tokenizer: Any | None  # a transformers tokenizer, or None when the checkpoint ships none
    config_file: ConfigFile
    choice: KernelChoice
    source: ResolvedSource
    device: DeviceInfo
    dtype: torch.dtype
    weight_files: list[str] = field(default_factory=list)
    # the prompt format for chat messages when a request names none (None: chosen from the model, prompts.py)
    prompt_format: str | None = None
    # the decode engine: "auto" (Llama-family models batch their requests in it) or "off"; its KV-cache budget
    engine: str = "auto"
    kv_cache: int | str | None = None
    # a split across devices (placement.py): where each decoder layer runs, and the kernel on each device
    placement: Placement | None = None
    kernels: dict[str, str] | None = None
    head: str = "float"  # the output head as loaded: "float", or "int8"/"int4" quantized at load time (head.py)
    # generations outside the engine run one at a time (they share the weights and, on a GPU, the memory)
    generation_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # the decode engine itself, made at the first request that uses it (engine/generator.py: engine_for)
    decode_engine: Any | None = field(default=None, repr=False, compare=False)

    @property
    def quantize_config(self) -> QuantizeConfig:
        return self.config_file.config

    @property
    def kernel(self) -> str:
        """Name of the kernel serving the quantized layers."""
        return self.choice.chosen

    def stream(self, prompt=None, *, cancel: threading.Event | None = None, **kwargs: Any) -> GenerationStream:
        """Generate, streaming: `for chunk in lm.stream("Hi", max_new_tokens=20): print(chunk.text, end="")`.

        `prompt` is a string (sent as it is), a list of chat messages (`{"role": ..., "content": ...}` or
        `ChatMessage`, rendered with the model's prompt format) or a `GenerationRequest`. Keywords are the
        `GenerationParams` fields and the request's `prompt_format`, `input`, `truncate`, `context_length`.
        The returned stream has `.result` once iterated to the end and `.cancel()` for any thread.
        """
        return GenerationStream(self, make_request(prompt, **kwargs), cancel)

    def generate(self, prompt=None, *, cancel: threading.Event | None = None, **kwargs: Any) -> GenerationResult:
        """Generate to the end and return the `GenerationResult` (same arguments as `stream`)."""
        with self.stream(prompt, cancel=cancel, **kwargs) as s:
            return s.consume()
