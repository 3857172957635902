"""Typed values that cross the plugin contract (see hookspecs.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .config import QuantizeConfig


class LayerShape(BaseModel):
    """One quantized Linear of the model: its name and widths."""

    model_config = ConfigDict(frozen=True)

    name: str
    in_features: int
    out_features: int
    bias: bool = False


class DeviceInfo(BaseModel):
    """Where the model will run. `capability` is (major, minor) for CUDA devices, None for the CPU."""

    model_config = ConfigDict(frozen=True)

    type: Literal["cpu", "cuda"]
    index: int | None = None
    capability: tuple[int, int] | None = None
    name: str = ""

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type, self.index) if self.index is not None else torch.device(self.type)

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    @classmethod
    def parse(cls, spec: str | torch.device | None) -> DeviceInfo:
        """'cpu', 'cuda', 'cuda:1' or None (first CUDA device if there is one, else the CPU)."""
        from .errors import GPTQBridgeError

        if spec is None:
            spec = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise GPTQBridgeError(f"device {spec!r} is not understood; use 'cpu', 'cuda' or 'cuda:N'") from None
        if dev.type == "cpu":
            return cls(type="cpu")
        if dev.type != "cuda":
            raise GPTQBridgeError(f"device {spec!r}: only 'cpu' and 'cuda[:N]' are supported")
        if not torch.cuda.is_available():
            raise GPTQBridgeError(f"device {spec!r} asked for, but torch sees no CUDA device here")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise GPTQBridgeError(f"device {spec!r}: there are only {torch.cuda.device_count()} CUDA devices")
        return cls(
            type="cuda",
            index=index,
            capability=torch.cuda.get_device_capability(index),
            name=torch.cuda.get_device_name(index),
        )


KernelFactory = Callable[[LayerShape, QuantizeConfig, torch.dtype], torch.nn.Module]


class KernelSpec(BaseModel):
    """What a kernel can serve, and how to build its quantized Linear.

    Capabilities are plain data so selection can reason about them without importing anything heavy;
    `check_available` is only called for kernels that pass every other test, because for some kernels
    it means compiling a CUDA extension.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    description: str
    # other names `kernel=` accepts for this kernel (a renamed kernel keeps its old name working); explain shows them
    aliases: frozenset[str] = frozenset()
    bits: frozenset[int]
    group_sizes: frozenset[int] | None = None  # None: any group size (-1 included)
    act_order: bool = True
    asymmetric: bool = True  # False: symmetric checkpoints only
    zero_formats: frozenset[str] = frozenset({"gptq", "gptq_v2"})
    devices: frozenset[str]
    min_capability: tuple[int, int] | None = None  # CUDA compute capability
    dtypes: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16, torch.float32})
    # Measured microseconds per call on the benchmark's reference layer, keyed by (bits, rows per call), valid
    # on devices of type `measured_on`. Selection ranks eligible kernels by these (selection.WORKLOAD) first;
    # kernels without numbers for the checkpoint's bits come after them, by `priority` (higher first).
    measured_us: dict[tuple[int, int], float] = Field(default_factory=dict)
    measured_on: str = "cuda"
    priority: int = 0
    factory: KernelFactory
    check_available: Callable[[], str | None] = Field(default=lambda: None)
    check_layer: Callable[[LayerShape, QuantizeConfig], str | None] = Field(default=lambda layer, config: None)
    # Whole-model check, run after the layer checks: (layers, config, device, dtype) -> reason or None.
    check_model: Callable[[Any, QuantizeConfig, DeviceInfo, torch.dtype], str | None] = Field(
        default=lambda layers, config, device, dtype: None
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or not v.replace("-", "").replace("_", "").isalnum():
            raise ValueError("kernel names are letters, digits, '-' and '_'")
        return v


class KernelVerdict(BaseModel):
    name: str
    aliases: list[str] = Field(default_factory=list)  # other names the kernel answers to
    eligible: bool
    reason: str
    # measured cost of selection.WORKLOAD for this checkpoint's bits on this device type (None: not measured)
    workload_us: float | None = None


class KernelChoice(BaseModel):
    """The chosen kernel and, for every registered kernel, why it is or is not eligible (best first)."""

    chosen: str
    verdicts: list[KernelVerdict]


class ResolvedSource(BaseModel):
    """A model source turned into a local directory."""

    text: str  # what the user wrote
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None


class LoadOptions(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    kernel: str = "auto"
    device: DeviceInfo
    dtype: torch.dtype
    trust_remote_code: bool = False
    allow_pickle: bool = False
    load_tokenizer: bool = True
    progress: Callable[[str], None] | None = None  # told about each weight file as loading reaches it
    engine: Literal["auto", "off"] = "auto"  # "off": generate with transformers' forward, one call at a time
    kv_cache: int | str | None = None  # the engine's KV-cache budget: tokens (8192) or a size ("4GiB")
    # a split across devices (placement.py): budgets in fill order, or "auto" (from the free memory at load)
    budgets: list[Any] | None = None  # placement.Budget
    device_map: Literal["auto"] | None = None
    head: Literal["auto", "float", "int8", "int4"] = "auto"  # the output head on the CPU (head.py)

    @property
    def split_requested(self) -> bool:
        return self.budgets is not None or self.device_map == "auto"


# --- generation: the contract is fixed here, the generator itself lives in the generation module ---


class GenerationParams(BaseModel):
    """Sampling parameters; unknown names and out-of-range values are errors that name the parameter.

    Penalties (repetition, presence, frequency) look at the last `repetition_penalty_range` tokens of the
    context, prompt included (0 = the whole context), as text-generation-webui does.
    """

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    typical_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    repetition_penalty_range: int = Field(0, ge=0)  # 0 = whole context
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, lt=2**63)  # None: a fresh random seed, reported in the result
    stop: list[str] = Field(default_factory=list)
    banned_token_ids: list[int] = Field(default_factory=list)
    ban_eos: bool = False
    add_bos: bool | None = None  # None: as the tokenizer does
    skip_special_tokens: bool = True

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return list(dict.fromkeys(v))

    @field_validator("banned_token_ids")
    @classmethod
    def _banned(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v):
            raise ValueError("token ids are >= 0")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class GenerationRequest(BaseModel):
    """A prompt string (sent as it is) or a list of chat messages (rendered by a prompt format), plus parameters.

    `prompt_format` names a registered format for `messages` (default: chosen from the model, see prompts.py);
    `input` fills the `### Input:` slot of formats that have one (alpaca). `context_length` caps the context
    below the model's own (text-generation-webui's truncation_length). The prompt may use
    `context_length - max_new_tokens` tokens; a longer one is cut from the left (`truncate="left"`, reported in
    the result) or refused (`truncate="error"`).
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    params: GenerationParams = Field(default_factory=GenerationParams)
    truncate: Literal["left", "error"] = "left"
    prompt_format: str | None = None
    input: str | None = None
    context_length: int | None = Field(None, ge=2)

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerationRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt (a string) and messages (a list of chat messages)")
        if self.messages is not None and not self.messages:
            raise ValueError("messages is empty")
        return self


class GenerationChunk(BaseModel):
    text: str  # new text since the previous chunk (never part of a stop string, never half a character)
    full_text: str  # all text so far
    token_ids: list[int]  # tokens generated since the previous chunk


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class GenerationResult(BaseModel):
    text: str
    finish_reason: Literal["stop", "length", "eos", "cancelled"]
    stop_string: str | None = None
    usage: Usage
    truncated_prompt_tokens: int = 0
    token_ids: list[int] = Field(default_factory=list)  # every generated token, stop and eos tokens included
    prompt_format: str | None = None  # the format that rendered `messages`; None for a plain prompt string
    seed: int | None = None  # the seed sampling used (drawn at random when the request gave none)
    extra: dict[str, Any] = Field(default_factory=dict)


class PromptFormat(BaseModel):
    """A way to turn chat messages into the prompt text a model was trained on.

    `render(messages, tokenizer=..., input=...)` returns the text, ending where the assistant's reply begins.
    `stop` are strings that end a reply in this format (added to the request's own). `model_patterns` are
    regular expressions matched (case-insensitively) against the model's name to choose the format when
    nobody chose one and the tokenizer has no chat template.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    description: str
    render: Callable[..., str]
    stop: tuple[str, ...] = ()
    model_patterns: tuple[str, ...] = ()
