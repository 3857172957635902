"""The model the adapter tests run on: the embedded default model (prepared once per session)."""

from __future__ import annotations


def adapter_source() -> str:
    """The default model's directory. Test modules using it declare `usefixtures("default_model")`, which
    prepares it and points GPTQ_BRIDGE_CACHE at the session's cache first."""
    from gptq_bridge.default_model import default_source

    return default_source()
