"""The plugin contract of gptq-bridge: the table of contents of the whole system.

Every piece that does real work (kernels, the loader, the generator) reaches the core through these hooks.
Built-ins are registered exactly as third-party plugins are: a module with `@hookimpl` functions. A package
becomes a plugin by naming such a module in the `gptq_bridge` entry-point group:

    [project.entry-points.gptq_bridge]
    my_kernel = "my_package.gptq_plugin"
"""

from __future__ import annotations

import pluggy

PROJECT = "gptq_bridge"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def gptq_register_kernels(register):
    """Called when the kernel registry is built; call `register(KernelSpec)` once per kernel provided."""


@hookspec(firstresult=True)
def gptq_load_model(source, options):
    """Load a `ResolvedSource` with `LoadOptions` into a `LoadedModel`; return None to let the next loader try.

    Plugins registered later run first, so a plugin can take over a model family from the built-in loader.
    """


@hookspec(firstresult=True)
def gptq_generate(model, request, cancel):
    """Generate for a `GenerationRequest` on a `LoadedModel`; return None to let the next generator try.

    Returns an iterator of `GenerationChunk`s whose last item is the `GenerationResult`. `cancel` is a
    `threading.Event` (or None): once set, from any thread, generation ends with finish_reason "cancelled".
    """


@hookspec
def gptq_register_prompt_formats(register):
    """Called when the prompt-format registry is built; call `register(PromptFormat)` once per format provided."""


@hookspec
def gptq_register_commands(subparsers):
    """Called when the CLI is built; add subcommands with `subparsers.add_parser(...)` and set `func=`.

    `func(args)` returns the exit code; it raises `GPTQBridgeError` for user errors (printed as one line).
    """
