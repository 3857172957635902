"""The model the adapter tests run on. Built once per test session into a temporary directory."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def adapter_source() -> str:
    """A tiny GPTQ checkpoint with a byte-level tokenizer and a ChatML template (random weights)."""
    import atexit
    import shutil

    from gen_models import byte_checkpoint

    root = Path(tempfile.mkdtemp(prefix="gptq-bridge-adapters-"))
    atexit.register(shutil.rmtree, root, True)
    return str(byte_checkpoint(root / "tiny-chat"))
