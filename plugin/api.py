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
    gpu_split=None,
    max_memory=None,
    device_map: str | None = None,
    head: str = "auto",
) -> LoadOptions:
    """`load_model`'s keywords as `LoadOptions`: the device parsed (None = CUDA if present), the dtype defaulted.

    With a split (`gpu_split`, `max_memory`, `device_map="auto"`) the device is the first one of the split
    (it holds the embeddings), and the dtype float16 when a GPU takes part."""
    from .placement import budgets_from

    budgets = budgets_from(gpu_split, max_memory)
    if device_map not in (None, "auto"):
        raise GPTQBridgeError(f"device_map: {device_map!r}; only 'auto' is supported (or give gpu_split / max_memory)")
    if device_map == "auto" and budgets is not None:
        raise GPTQBridgeError("device_map='auto' chooses the budgets itself; leave out gpu_split / max_memory")
    if (budgets is not None or device_map == "auto") and device is not None:
        raise GPTQBridgeError(
            f"device {str(device)!r} and a split across devices both given; a split names its devices itself"
        )
    if budgets is not None:
        for b in budgets:
            DeviceInfo.parse(b.device)  # a GPU that is not there fails now
        dev = DeviceInfo.parse(budgets[0].device)
        if dtype is None and any(b.device.startswith("cuda") for b in budgets):
            dtype = torch.float16
    else:
        dev = device if isinstance(device, DeviceInfo) else DeviceInfo.parse(device)
    if engine not in ("auto", "off"):
        raise GPTQBridgeError(f"engine: {engine!r} is not one of 'auto', 'off'")
    if kv_cache is not None:
        from .engine.kv_cache import parse_budget

        parse_budget(kv_cache)
    from .head import check_head

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
        budgets=budgets,
        device_map=device_map,
        head=check_head(head),
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
    gpu_split: list[float] | str | None = None,
    max_memory: dict | list | str | None = None,
    device_map: str | None = None,
    head: str = "auto",
) -> LoadedModel:
    """Load a GPTQ checkpoint (a directory, or a hub id `org/name[:branch]`) ready to run.

    With no source, the embedded default model (prepared on first use, see default_model.py).
    The first loader plugin that accepts the source loads it; the built-in loader goes last.
    `progress`, if given, is called with a line of text as loading reaches each weight file.
    `engine`: "auto" generates Llama-family models in the decode engine (batched requests, a paged KV cache,
    CUDA graphs on a GPU); "off" uses transformers' forward, one generation at a time. `kv_cache` sets the
    engine's cache budget: tokens (8192) or a size ("4GiB"); by default half the free GPU memory, or four
    contexts on the CPU. `head`: the output head on the CPU, "int8", "int4" or "float" (a float head quantized at
    load time, a quantized one kept); "auto" gives the default model its measured choice, others float (head.py).

    A model too large for one device is split across several, whole decoder layers each (placement.py):
    `gpu_split=[20, 24]` (GiB per GPU, in order), `max_memory={0: "20GiB", 1: "24GiB", "cpu": "48GiB"}` (GPUs
    in order, then the CPU; a list of (device, size) pairs keeps its own order), or `device_map="auto"` (from
    the memory free at load). A budget holds the weights and the KV cache its layers keep; leave room for
    activations. Layers on the CPU run with a CPU kernel.
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
        gpu_split=gpu_split,
        max_memory=max_memory,
        device_map=device_map,
        head=head,
    )
    loaded = get_plugin_manager().hook.gptq_load_model(source=resolved, options=options)
    if loaded is None:
        raise GPTQBridgeError(f"{source}: no loader plugin accepted this source")
    return loaded
