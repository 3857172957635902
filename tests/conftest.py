import os
import signal
from pathlib import Path

import pytest

# Tests never touch the network: huggingface_hub reads this once, at import, so it is set before any import.
os.environ["HF_HUB_OFFLINE"] = "1"
# Without a GPU, Triton kernels run in triton's interpreter. triton reads this when its own library functions
# are defined (at `import triton`), and several test modules import it indirectly, so it is set here first.
import torch  # noqa: E402

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# torch's own choice for this machine, before any test changes it: the default model is prepared with it, as a
# user's first `gptq-bridge generate` does (the thread count changes the float rounding, so the checkpoint)
_STARTUP_THREADS = torch.get_num_threads()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CPU decode step's compiled stretch (engine/cpu_compiled.py) is built in a background process the first
# time a shape decodes; tests would start one per tiny model. Off, except in the tests of it.
os.environ.setdefault("GPTQ_BRIDGE_CPU_COMPILE", "0")

# The embedded default model is prepared once per test session into a private cache (a few minutes on a
# small CPU). Developers may point GPTQ_BRIDGE_TEST_CACHE at a folder to keep the prepared model between runs:
# it is used only while its manifest's fingerprint (settings, quantizer source, calibration data, GGUF, library
# versions) is today's, and prepared again otherwise.
_TEST_CACHE = os.environ.get("GPTQ_BRIDGE_TEST_CACHE")
_QUALITY_REPORT: list[str] = []


def default_sigint() -> None:
    """preexec_fn for a child that a test interrupts with SIGINT: a test run started in the background of a
    non-interactive shell inherits SIGINT ignored, and so would the child, where the test needs Ctrl-C's
    default behaviour."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
    before = torch.get_num_threads()
    torch.set_num_threads(_STARTUP_THREADS)
    try:
        return Path(default_source())
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def quality_report() -> list[str]:
    """Lines that tests append to; printed in the terminal summary, so CI logs show the rates measured."""
    return _QUALITY_REPORT


def pytest_terminal_summary(terminalreporter):
    if _QUALITY_REPORT:
        terminalreporter.section("default model quality")
        for line in _QUALITY_REPORT:
            terminalreporter.write_line(line)
