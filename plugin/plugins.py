"""The plugin manager: built-in plugins, the plugins installed packages name through entry points, registries.

Process-wide state of gptq-bridge, all of it:

- the plugin manager (`get_plugin_manager`), built once per process;
- the model cache (`model_cache.shared_models`): one loaded model per (checkpoint, kernel, device, dtype);
- the kernels' scratch buffers (`kernels/base.py`: one per device and dtype, grown to the largest request),
  with one lock per device that every launch writing them holds, so models sharing a GPU never interleave
  in them; exllama's dequantize scratch per device (`kernels/exllama.py`), written only inside calls that
  the same lock guards;
- the triton JIT cache: compiled kernels per specialization, kept by triton and by each layer's launch plan;
- the CUDA library handle (`kernels/cuda/build.py`): the mma kernel's library, built and loaded once.
- in the ingress process of `serve --replicas` (`adapters/ray_serve.py`): the Ray Serve request router of the
  model deployment, kept by name so the ingress can read its view of the replicas.

Which third-party plugins load is chosen by GPTQ_BRIDGE_LOAD_PLUGINS: unset, every entry point of the
`gptq_bridge` group; otherwise a comma-separated list of entry-point names or module names, and the empty
string loads none (the built-ins always load).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from functools import lru_cache
from importlib import metadata
from typing import TypeVar

import pluggy

from . import hookspecs
from .errors import GPTQBridgeError
from .types import KernelSpec, ResolvedSource

LOAD_PLUGINS_ENV = "GPTQ_BRIDGE_LOAD_PLUGINS"

# Built-in plugins, registered through the same hooks as any third-party plugin. The frontend adapters are
# not among them: the webui adapter is registered through this package's own entry point.
DEFAULT_PLUGINS = (
    "gptq_bridge.sources",
    "gptq_bridge.kernels.torch_ref",
    "gptq_bridge.kernels.cpu_int4",
    "gptq_bridge.kernels.triton_gptq",
    "gptq_bridge.kernels.exllama",
    "gptq_bridge.kernels.cuda.mma",
    "gptq_bridge.loader",
    "gptq_bridge.explain",
    "gptq_bridge.quantize.command",
    "gptq_bridge.engine.generator",
    "gptq_bridge.generation",
    "gptq_bridge.prompts",
    "gptq_bridge.commands",
    "gptq_bridge.check",
    "gptq_bridge.plugin_commands",
)


@lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """The one plugin manager of the process: built-ins, then the entry-point plugins LOAD_PLUGINS_ENV allows.

    Every hook implementation is checked against the specs once all are registered (`check_pending`), so a
    misspelt hook name fails here, naming the plugin, instead of never being called.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    try:
        for name in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(name), name=name)
        load_entry_point_plugins(pm, os.environ.get(LOAD_PLUGINS_ENV))
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        plugin = pm.get_name(exc.plugin) or getattr(exc.plugin, "__name__", repr(exc.plugin))
        raise GPTQBridgeError(f"plugin {plugin!r}: {exc}") from None
    return pm


def entry_points() -> dict[str, metadata.EntryPoint]:
    """The `gptq_bridge` entry points of the installed distributions, by name."""
    return {ep.name: ep for ep in metadata.entry_points(group=hookspecs.PROJECT)}


def load_entry_point_plugins(pm: pluggy.PluginManager, wanted: str | None) -> None:
    """Register the entry-point plugins: all of them (`wanted` None), or those named in `wanted` (comma-separated
    entry-point names or module names; "" for none)."""
    if wanted is None:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        return
    available = entry_points()
    for name in (n.strip() for n in wanted.split(",")):
        if not name or pm.has_plugin(name):
            continue
        if name in available:
            plugin = available[name].load()
        else:
            try:
                plugin = importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name is None or not name.startswith(exc.name):
                    raise  # the plugin was found, but something it imports is missing
                names = ", ".join(sorted(available)) or "none installed"
                raise GPTQBridgeError(
                    f"{LOAD_PLUGINS_ENV}: {name!r} is neither an entry point of the "
                    f"{hookspecs.PROJECT!r} group ({names}) nor an importable module"
                ) from None
        pm.register(plugin, name=name)


T = TypeVar("T")


def collect_registry(
    hook: Callable[..., object],
    kind: str,
    expected: type[T],
    names: Callable[[T], list[str]] = lambda item: [item.name],
) -> list[T]:
    """Call a `gptq_register_*` hook and check what the plugins registered: each item is an `expected`, and no
    name (as `names` gives them, aliases included) is registered twice. Errors name the kind and the item."""
    items: list = []
    hook(register=items.append)
    owner: dict[str, object] = {}
    for item in items:
        if not isinstance(item, expected):
            raise GPTQBridgeError(f"a plugin registered {item!r} as a {kind}; expected a {expected.__name__}")
        for name in names(item):
            if name in owner:
                raise GPTQBridgeError(f"two plugins register a {kind} named {name!r}; {kind} names must be unique")
            owner[name] = item
    return items


def resolve(source: str, *, revision: str | None = None, allow_pickle: bool = False) -> ResolvedSource:
    """A source string to a local checkpoint directory, by the first `gptq_resolve_source` plugin that knows it
    (the built-in sources.py goes last)."""
    resolved = get_plugin_manager().hook.gptq_resolve_source(
        source=source, revision=revision, allow_pickle=allow_pickle
    )
    if resolved is None:
        raise GPTQBridgeError(f"{source}: no source plugin resolved this source")
    return resolved


def registered_kernels(pm: pluggy.PluginManager | None = None) -> list[KernelSpec]:
    """Every kernel the registered plugins provide; names and aliases must be unique."""
    pm = pm or get_plugin_manager()
    return collect_registry(
        pm.hook.gptq_register_kernels, "kernel", KernelSpec, lambda spec: [spec.name, *sorted(spec.aliases)]
    )
