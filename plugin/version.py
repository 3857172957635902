"""The installed package's version (from its metadata), or "0+unknown" in a source tree that was not installed."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("gptq-bridge")
except metadata.PackageNotFoundError:
    __version__ = "0+unknown"
