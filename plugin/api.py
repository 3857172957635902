"""The public entry points: `load_model`, and the `LoadOptions` and source resolution everything else shares.

`explain`, `info`, `check` and the model cache turn the same keywords into the same options here, so a load
and its explanation cannot disagree about a device or a dtype. Sources are resolved by `plugins.resolve`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import GPTQBridgeError
from .loaded_model import LoadedModel
from .plugins import get_plugin_manager, resolve
from .types import DeviceInfo, LoadOptions


def default_dtype(device: DeviceInfo) -> torch.dtype:
    """float16 on GPUs (what the kernels are built for); float32 on the CPU (fast and exact there)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_options(
    *,
    kernel: str = "auto",
    device: str | torch.device | DeviceInfo | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    load_tokenizer: bool = True,
    progress: Callable[[str], None] | None = None,
    engine: str = "auto",
    kv_cache: int | str | None = None,
) -> LoadOptions:
    """`load_model`'s keywords as `LoadOptions`: the device parsed (None = CUDA if present), the dtype defaulted."""
    dev = device if isinstance(device, DeviceInfo) else DeviceInfo.parse(device)
    if engine not in ("auto", "off"):
        raise GPTQBridgeError(f"engine: {engine!r} is not one of 'auto', 'off'")
    if kv_cache is not None:
        from .engine.kv_cache import parse_budget

        parse_budget(kv_cache)
    return LoadOptions(
        kernel=kernel,
        device=dev,
        dtype=dtype or default_dtype(dev),
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        load_tokenizer=load_tokenizer,
        progress=progress,
        engine=engine,
        kv_cache=kv_cache,
    )


def load_model(
    source: str | None = None,
    *,
    kernel: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    load_tokenizer: bool = True,
    progress: Callable[[str], None] | None = None,
    engine: str = "auto",
    kv_cache: int | str | None = None,
) -> LoadedModel:
    """Load a GPTQ checkpoint (a directory, or a hub id `org/name[:branch]`) ready to run.

    With no source, the embedded default model (prepared on first use, see default_model.py).
    The first loader plugin that accepts the source loads it; the built-in loader goes last.
    `progress`, if given, is called with a line of text as loading reaches each weight file.
    `engine`: "auto" generates Llama-family models in the decode engine (batched requests, a paged KV cache,
    CUDA graphs on a GPU); "off" uses transformers' forward, one generation at a time. `kv_cache` sets the
    engine's cache budget: tokens (8192) or a size ("4GiB"); by default half the free GPU memory, or four
    contexts on the CPU.
    """
    if source is None:
        from .default_model import default_source

        source = default_source()
    resolved = resolve(source, revision=revision, allow_pickle=allow_pickle)
    options = load_options(
        kernel=kernel,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        load_tokenizer=load_tokenizer,
        progress=progress,
        engine=engine,
        kv_cache=kv_cache,
    )
    loaded = get_plugin_manager().hook.gptq_load_model(source=resolved, options=options)
    if loaded is None:
        raise GPTQBridgeError(f"{source}: no loader plugin accepted this source")
    return loaded
