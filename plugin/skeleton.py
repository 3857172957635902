"""The model skeleton: a transformers architecture built on the meta device, nothing full-size allocated.

Shared by the loader (which fills the skeleton with quantized layers and checkpoint tensors) and the quantizer
(which reads a source model into it block by block), so neither imports the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

# Tensors older writers saved that current models recompute; safe to skip.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_config(model_dir: Path, trust_remote_code: bool):
    """The architecture from config.json, without its quantization block (we do the quantization)."""
    from transformers import AutoConfig

    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: config.json is missing (the model architecture is read from it)")
    try:
        hf_config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        hint = (
            " (pass trust_remote_code=True if you trust this model's code)" if "trust_remote_code" in str(exc) else ""
        )
        raise ConfigError(
            f"{path}: transformers cannot read this architecture: {str(exc).splitlines()[0]}{hint}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    return hf_config


def build_skeleton(hf_config, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model with every parameter and buffer on the meta device: nothing full-size is allocated."""
    from transformers import AutoModelForCausalLM, initialization

    # transformers builds its own models this way: meta tensors, with creation ops that __init__ code calls
    # for Python numbers (linspace, ...) kept on the CPU.
    safe_ops = getattr(initialization, "meta_device_safe_creation_ops", contextlib.nullcontext)
    with torch.device("meta"), safe_ops():
        try:
            return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError as exc:
            raise ConfigError(
                f"config.json: transformers has no causal LM for this architecture: {str(exc).splitlines()[0]}"
            ) from None


def materialize_buffers(model: nn.Module, device: torch.device | Callable[[str], torch.device]) -> None:
    """Compute the buffers no checkpoint holds (rotary frequencies), as transformers' own loader does; `device`
    may be a function of the module's name (a model split across devices)."""
    for module_name, module in model.named_modules():
        names = [
            n
            for n, b in module._buffers.items()
            if b is not None and b.is_meta and n in module._non_persistent_buffers_set
        ]
        for name in names:
            where = device(module_name) if callable(device) else device
            module._buffers[name] = torch.empty_like(module._buffers[name], device=where)
        if names:
            model._init_weights(module)
