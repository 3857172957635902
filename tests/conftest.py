import os
from pathlib import Path

import pytest

# Tests never touch the network: huggingface_hub reads this once, at import, so it is set before any import.
os.environ["HF_HUB_OFFLINE"] = "1"
# Without a GPU, Triton kernels run in triton's interpreter. triton reads this when its own library functions
# are defined (at `import triton`), and several test modules import it indirectly, so it is set here first.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The embedded default model is prepared once per test session into a private cache (a few minutes on a
# small CPU). Developers may point GPTQ_BRIDGE_TEST_CACHE at a folder to keep the prepared model between runs.
_TEST_CACHE = os.environ.get("GPTQ_BRIDGE_TEST_CACHE")


@pytest.fixture
def plugin():
    """Register plugin objects for one test (`plugin(obj)`), and remove them afterwards."""
    from gptq_bridge.plugins import get_plugin_manager

    pm = get_plugin_manager()
    registered = []

    def register(obj):
        pm.register(obj)
        registered.append(obj)
        return obj

    yield register
    for obj in registered:
        pm.unregister(obj)


@pytest.fixture(scope="session")
def default_model(tmp_path_factory) -> Path:
    """The prepared default model's directory; GPTQ_BRIDGE_CACHE points at the cache holding it."""
    from gptq_bridge.default_model import CACHE_ENV, default_source

    cache = Path(_TEST_CACHE) if _TEST_CACHE else tmp_path_factory.mktemp("gptq-bridge-cache")
    os.environ[CACHE_ENV] = str(cache)
    return Path(default_source())
