"""gptq-bridge: run GPTQ checkpoints fast, in the frontends people already use.

import gptq_bridge
lm = gptq_bridge.load_model("TheBloke/Nous-Hermes-Llama2-70B-GPTQ:gptq-4bit-32g-actorder_True")
logits = lm.model(input_ids).logits
"""

from __future__ import annotations

import os
import sys

if "torch" not in sys.modules:
    # OpenMP threads that spin while waiting make every parallel op crawl when another process holds one
    # of the cores: on the 2-core machine, loading and answering with the default model took 15 s + 6 s
    # instead of 4 s + 0.6 s. Passive waiting costs nothing measurable here. Only when gptq-bridge is the
    # first to import torch (its own CLI, scripts that import it first), and never over the user's setting.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .api import default_dtype, load_model, load_options  # noqa: E402
from .config import QuantizeConfig, read_quantize_config  # noqa: E402
from .errors import CheckpointError, ConfigError, GPTQBridgeError, KernelError, SourceError  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .loaded_model import LoadedModel  # noqa: E402
from .plugins import get_plugin_manager, registered_kernels  # noqa: E402
from .version import __version__  # noqa: E402, F401 - re-exported

__all__ = [
    "load_model",
    "load_options",
    "default_dtype",
    "LoadedModel",
    "QuantizeConfig",
    "read_quantize_config",
    "hookimpl",
    "get_plugin_manager",
    "registered_kernels",
    "GPTQBridgeError",
    "ConfigError",
    "CheckpointError",
    "KernelError",
    "SourceError",
]
