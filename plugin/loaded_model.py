"""What `load_model` returns: the running model and everything known about how it was loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .config import ConfigFile, QuantizeConfig
from .types import DeviceInfo, KernelChoice, ResolvedSource


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

    @property
    def quantize_config(self) -> QuantizeConfig:
        return self.config_file.config

    @property
    def kernel(self) -> str:
        """Name of the kernel serving the quantized layers."""
        return self.choice.chosen
