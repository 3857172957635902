"""Loaded models shared by everything in one process: two adapters naming the same source load it once.

The key is what decides the loaded result: the resolved checkpoint directory (so `./m` and `/abs/m`, or a hub
id and its cached snapshot, are the same model), the kernel, the device, the dtype, the safety opt-ins and a
split across devices (its budgets and the KV cache it reserves).
Loading one key twice at the same time waits for the first load instead of starting a second. A source is
resolved once per process: adapters ask for their model on every request, and resolving a hub id online
would cost a round trip to the hub each time.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any

import torch

from .api import load_model, load_options
from .loaded_model import LoadedModel
from .plugins import resolve


class ModelCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple, LoadedModel] = {}
        self._loading: dict[tuple, threading.Lock] = {}
        self._paths: dict[tuple, str] = {}

    def key(
        self,
        source: str,
        *,
        kernel: str = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        gpu_split=None,
        max_memory=None,
        device_map: str | None = None,
        kv_cache: int | str | None = None,
    ) -> tuple:
        spelled = (source, revision, allow_pickle)
        if spelled not in self._paths:
            self._paths[spelled] = str(resolve(source, revision=revision, allow_pickle=allow_pickle).path)
        options = load_options(
            kernel=kernel,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            gpu_split=gpu_split,
            max_memory=max_memory,
            device_map=device_map,
            kv_cache=kv_cache,
        )
        split = (
            None
            if not options.split_requested
            else (options.device_map, tuple((b.device, b.bytes) for b in options.budgets or ()), str(kv_cache))
        )
        return (
            self._paths[spelled],
            options.kernel,
            str(options.device),
            str(options.dtype),
            trust_remote_code,
            allow_pickle,
            split,
        )

    def get(self, source: str, **options: Any) -> LoadedModel:
        """The loaded model for `source` with these `load_model` options, loading it on first use."""
        key = self.key(source, **options)
        with self._lock:
            if key in self._models:
                return self._models[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            loaded = load_model(source, **options)
            with self._lock:
                self._models[key] = loaded
                self._loading.pop(key, None)
            return loaded

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def clear(self) -> None:
        """Forget every model (memory is freed once no caller holds one)."""
        with self._lock:
            self._models.clear()


@lru_cache(maxsize=1)
def shared_models() -> ModelCache:
    """The process's model cache."""
    return ModelCache()


def get_model(source: str, **options: Any) -> LoadedModel:
    """`load_model`, but each distinct (checkpoint, kernel, device, dtype) is loaded once per process."""
    return shared_models().get(source, **options)
