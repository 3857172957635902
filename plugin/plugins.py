"""The plugin manager: built-in plugins, plugins found through entry points, and the kernel registry."""

from __future__ import annotations

import importlib
from functools import lru_cache

import pluggy

from . import hookspecs
from .errors import GPTQBridgeError
from .types import KernelSpec

# Built-in plugins, registered through the same hooks as any third-party plugin.
DEFAULT_PLUGINS = (
    "gptq_bridge.sources",
    "gptq_bridge.kernels.torch_ref",
    "gptq_bridge.kernels.triton_gptq",
    "gptq_bridge.kernels.exllama",
    "gptq_bridge.kernels.cuda.mma",
    "gptq_bridge.loader",
    "gptq_bridge.explain",
    "gptq_bridge.quantize.command",
    "gptq_bridge.generation",
    "gptq_bridge.prompts",
    "gptq_bridge.commands",
    "gptq_bridge.check",
    "gptq_bridge.adapters.textgen",
)


@lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """The one plugin manager of the process (the only global state of gptq-bridge)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    return pm


def registered_kernels(pm: pluggy.PluginManager | None = None) -> list[KernelSpec]:
    """Every kernel the registered plugins provide; names must be unique."""
    pm = pm or get_plugin_manager()
    specs: list[KernelSpec] = []
    pm.hook.gptq_register_kernels(register=specs.append)
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, KernelSpec):
            raise GPTQBridgeError(f"a plugin registered {spec!r} as a kernel; expected a KernelSpec")
        if spec.name in seen:
            raise GPTQBridgeError(f"two plugins register a kernel named {spec.name!r}; kernel names must be unique")
        seen.add(spec.name)
    return specs
