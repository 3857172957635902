"""The plugin contract of gptq-bridge: the table of contents of the whole system.

Every piece that does real work (source resolution, kernels, the loader, the generator) reaches the core
through these hooks. Built-ins are registered exactly as third-party plugins are: a module with `@hookimpl`
functions. A package becomes a plugin by naming such a module in the `gptq_bridge` entry-point group:

    [project.entry-points.gptq_bridge]
    my_kernel = "my_package.gptq_plugin"

A hook implementation's name must be one of the specs below and its parameters a subset of the spec's
(pluggy passes them by name): a misspelt name or parameter fails when the plugin is loaded, not silently.
docs/plugins.md walks through a complete kernel plugin.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .loaded_model import LoadedModel
    from .types import (
        GenerationChunk,
        GenerationRequest,
        GenerationResult,
        KernelSpec,
        LoadOptions,
        PromptFormat,
        ResolvedSource,
    )

PROJECT = "gptq_bridge"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def gptq_resolve_source(source: str, revision: str | None, allow_pickle: bool) -> ResolvedSource | None:
    """Turn what the user wrote into a `ResolvedSource` (a local directory); return None to let the next one try.

    The built-in resolver (a directory, or a hub id `org/name[:branch]`) goes last, so a plugin can serve other
    spellings (another hub, a bucket) or take over hub ids. `allow_pickle` says whether .bin/.pt weight files
    may be fetched.
    """


@hookspec
def gptq_register_kernels(register: Callable[[KernelSpec], None]) -> None:
    """Called when the kernel registry is built; call `register(KernelSpec)` once per kernel provided."""


@hookspec(firstresult=True)
def gptq_load_model(source: ResolvedSource, options: LoadOptions) -> LoadedModel | None:
    """Load a `ResolvedSource` with `LoadOptions` into a `LoadedModel`; return None to let the next loader try.

    Plugins registered later run first, so a plugin can take over a model family from the built-in loader.
    """


@hookspec(firstresult=True)
def gptq_generate(
    model: LoadedModel, request: GenerationRequest, cancel: threading.Event | None
) -> Iterator[GenerationChunk | GenerationResult] | None:
    """Generate for a `GenerationRequest` on a `LoadedModel`; return None to let the next generator try.

    Returns an iterator of `GenerationChunk`s whose last item is the `GenerationResult`. `cancel` is a
    `threading.Event` (or None): once set, from any thread, generation ends with finish_reason "cancelled".
    """


@hookspec
def gptq_register_prompt_formats(register: Callable[[PromptFormat], None]) -> None:
    """Called when the prompt-format registry is built; call `register(PromptFormat)` once per format provided."""


@hookspec
def gptq_register_commands(subparsers: argparse._SubParsersAction) -> None:
    """Called when the CLI is built; add subcommands with `subparsers.add_parser(...)` and set `func=`.

    `func(args)` returns the exit code; it raises `GPTQBridgeError` for user errors (printed as one line).
    """
