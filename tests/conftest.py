import pytest


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never touch the network: the hub is read from local caches only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
