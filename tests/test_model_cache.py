import threading

import pytest
from tiny_checkpoints import build

from gptq_bridge.model_cache import ModelCache


@pytest.fixture
def checkpoint(tmp_path):
    return build(tmp_path / "ck").path


def test_same_checkpoint_spelled_two_ways_loads_once(checkpoint, monkeypatch):
    cache = ModelCache()
    monkeypatch.chdir(checkpoint.parent)
    a = cache.get(str(checkpoint), device="cpu")
    b = cache.get("./ck", device="cpu")
    assert a is b and len(cache.loaded()) == 1


def test_different_settings_are_different_models(checkpoint):
    import torch

    cache = ModelCache()
    a = cache.get(str(checkpoint), device="cpu")
    b = cache.get(str(checkpoint), device="cpu", dtype=torch.bfloat16)
    assert a is not b and b.dtype == torch.bfloat16 and len(cache.loaded()) == 2


def test_concurrent_first_use_loads_once(checkpoint):
    cache = ModelCache()
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get(str(checkpoint), device="cpu"))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r is results[0] for r in results) and len(cache.loaded()) == 1
