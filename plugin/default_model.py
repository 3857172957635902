"""The model used when the caller names none (`gptq-bridge generate "..."` without `--model`).

This is the one place where the embedded default model is wired in: `default_source()` returns a source
string that `load_model` accepts. The default model (SmolLM2-135M-Instruct, prepared on first use by the
project's own quantizer into the user cache) is not built yet, so for now it explains that `--model` is needed.
"""

from __future__ import annotations

from .errors import SourceError


def default_source() -> str:
    """The source of the default model, prepared if needed; raises SourceError when there is none."""
    raise SourceError(
        "no model given: pass --model SOURCE (a GPTQ checkpoint directory, or a hub id org/name[:branch]); "
        "the built-in default model is not available yet"
    )
