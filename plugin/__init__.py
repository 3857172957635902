"""gptq-bridge: run GPTQ checkpoints fast, in the frontends people already use.

    import gptq_bridge
    lm = gptq_bridge.load_model("TheBloke/Nous-Hermes-Llama2-70B-GPTQ:gptq-4bit-32g-actorder_True")
    logits = lm.model(input_ids).logits
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Callable

if "torch" not in sys.modules:
    # OpenMP threads that spin while waiting make every parallel op crawl when another process holds one
    # of the cores: on the 2-core machine, loading and answering with the default model took 15 s + 6 s
    # instead of 4 s + 0.6 s. Passive waiting costs nothing measurable here. Only when gptq-bridge is the
    # first to import torch (its own CLI, scripts that import it first), and never over the user's setting.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from .config import QuantizeConfig, read_quantize_config
from .errors import CheckpointError, ConfigError, GPTQBridgeError, KernelError, SourceError
from .hookspecs import hookimpl
from .loaded_model import LoadedModel
from .plugins import get_plugin_manager, registered_kernels
from .sources import resolve_source
from .types import DeviceInfo, LoadOptions

try:
    __version__ = metadata.version("gptq-bridge")
except metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "load_model", "LoadedModel", "QuantizeConfig", "read_quantize_config", "hookimpl", "get_plugin_manager",
    "registered_kernels", "GPTQBridgeError", "ConfigError", "CheckpointError", "KernelError", "SourceError",
]


def default_dtype(device: DeviceInfo) -> torch.dtype:
    """float16 on GPUs (what the kernels are built for); float32 on the CPU (fast and exact there)."""
    return torch.float16 if device.type == "cuda" else torch.float32


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
) -> LoadedModel:
    """Load a GPTQ checkpoint (a directory, or a hub id `org/name[:branch]`) ready to run.

    With no source, the embedded default model (prepared on first use, see default_model.py).
    The first loader plugin that accepts the source loads it; the built-in loader goes last.
    `progress`, if given, is called with a line of text as loading reaches each weight file.
    """
    if source is None:
        from .default_model import default_source

        source = default_source()
    resolved = resolve_source(source, revision=revision, allow_pickle=allow_pickle)
    dev = DeviceInfo.parse(device)
    options = LoadOptions(kernel=kernel, device=dev, dtype=dtype or default_dtype(dev),
                          trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                          load_tokenizer=load_tokenizer, progress=progress)
    loaded = get_plugin_manager().hook.gptq_load_model(source=resolved, options=options)
    if loaded is None:
        raise GPTQBridgeError(f"{source}: no loader plugin accepted this source")
    return loaded
