"""The KV cache of the decode engine: one preallocated pool of fixed-size blocks, shared by every request.

A request holds a list of blocks (its block table); token `p` of a request lives in slot
`table[p // block_size] * block_size + p % block_size` of the pool. A short request takes only the blocks it
needs, so many short chats fit where one long context would. Blocks are reserved for a request's whole
length (prompt + max_new_tokens) when it is admitted: once running, it never runs out of cache halfway.

Block 0 is never handed out: padded rows of a batch (CUDA-graph buckets) write there and read nothing else.
The pool is allocated uninitialised (on the CPU, pages are only touched as requests use them) and each
request's blocks are zeroed when it is admitted: attention masks the slots past a request's length, and a
masked slot must hold a finite number (0 x NaN is NaN).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import GPTQBridgeError

BLOCK_SIZE = 32  # tokens per block; the paged attention kernel reads one block per loop step


class CacheBudgetError(GPTQBridgeError):
    """A request needs more KV cache than the whole budget holds."""


@dataclass(frozen=True)
class CacheShape:
    """What one token costs in every layer: keys and values of each KV head."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.tensor([], dtype=self.dtype).element_size()


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|MiB|KiB|GB|MB|KB|tokens?)?\s*$", re.IGNORECASE)
_UNITS = {"gib": 2**30, "mib": 2**20, "kib": 2**10, "gb": 10**9, "mb": 10**6, "kb": 10**3}


def parse_budget(budget: int | str) -> tuple[int, str]:
    """A budget as the user writes it: a token count (`8192`, `"8192 tokens"`) or a size (`"4GiB"`, `"512MiB"`,
    `"2GB"`); returns (amount, "tokens" or "bytes")."""
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise GPTQBridgeError(f"kv_cache: {budget!r} is not a budget; give tokens (8192) or a size ('4GiB')")
    if isinstance(budget, int):
        amount, unit = budget, "tokens"
    else:
        m = _SIZE.match(budget)
        if not m:
            raise GPTQBridgeError(
                f"kv_cache: {budget!r} is not a budget; give tokens (8192) or a size ('4GiB', '512MiB')"
            )
        value, name = float(m.group(1)), (m.group(2) or "tokens").lower()
        amount, unit = (int(value), "tokens") if name.startswith("token") else (int(value * _UNITS[name]), "bytes")
    if amount <= 0:
        raise GPTQBridgeError(f"kv_cache: {budget!r} must be more than zero")
    return amount, unit


def budget_tokens(budget: int | str, shape: CacheShape) -> int:
    """How many tokens a budget holds for this model."""
    amount, unit = parse_budget(budget)
    tokens = amount if unit == "tokens" else amount // shape.bytes_per_token
    if tokens < BLOCK_SIZE:
        raise GPTQBridgeError(
            f"kv_cache: {budget!r} holds {tokens} tokens of this model; at least {BLOCK_SIZE} are needed"
        )
    return tokens


class BlockAllocator:
    """Which blocks are free. Pure bookkeeping, no tensors: the scheduler asks it before admitting a request."""

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE):
        if num_blocks < 2:
            raise GPTQBridgeError(f"kv_cache: {num_blocks} blocks; at least 2 are needed (block 0 is padding)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low numbers first

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def can_allocate(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= len(self._free)

    def allocate(self, tokens: int) -> list[int]:
        n = self.blocks_for(tokens)
        if n > len(self._free):
            raise CacheBudgetError(f"kv_cache: {tokens} tokens need {n} blocks, {len(self._free)} are free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """The pool itself: per layer, keys and values as [slots, kv_heads, head_dim] (slot = block * size + offset).

    `device` is one device, or one per layer (a model split across devices): each layer's cache then sits
    beside its layer, one allocation per run of consecutive layers on a device, all sharing one block table."""

    def __init__(
        self, shape: CacheShape, tokens: int, device: torch.device | list[torch.device], block_size: int = BLOCK_SIZE
    ):
        self.shape = shape
        self.block_size = block_size
        self.num_blocks = math.ceil(tokens / block_size) + 1  # + the padding block
        slots = self.num_blocks * block_size
        devices = [torch.device(d) for d in device] if isinstance(device, (list, tuple)) else [device] * shape.layers
        if len(devices) != shape.layers:
            raise GPTQBridgeError(f"kv_cache: {len(devices)} layer devices given for {shape.layers} layers")
        runs: list[tuple[torch.device, int]] = []  # (device, layers) of each run of consecutive layers
        for d in devices:
            if runs and runs[-1][0] == d:
                runs[-1] = (d, runs[-1][1] + 1)
            else:
                runs.append((d, 1))
        self.pools: list[tuple[torch.Tensor, torch.Tensor]] = []
        for d, n in runs:
            size = (n, slots, shape.kv_heads, shape.head_dim)
            try:
                self.pools.append(
                    (torch.empty(size, dtype=shape.dtype, device=d), torch.empty(size, dtype=shape.dtype, device=d))
                )
            except torch.OutOfMemoryError:
                raise CacheBudgetError(
                    f"kv_cache: {tokens} tokens ({tokens * shape.bytes_per_token * n / shape.layers / 2**30:.2f} GiB "
                    f"for {n} layers) do not fit in {d}'s free memory; give a smaller kv_cache"
                ) from None
        if len(self.pools) == 1:
            self.k, self.v = self.pools[0]  # [layers, slots, kv_heads, head_dim]
        else:
            self.k = [layer for k, _ in self.pools for layer in k.unbind(0)]
            self.v = [layer for _, v in self.pools for layer in v.unbind(0)]
        self.allocator = BlockAllocator(self.num_blocks, block_size)
        self.clear([0])

    def clear(self, blocks: list[int]) -> None:
        """Zero the given blocks in every layer."""
        if not blocks:
            return
        bs = self.block_size
        slots = (torch.tensor(blocks, dtype=torch.long)[:, None] * bs + torch.arange(bs)).flatten()
        for k, v in self.pools:
            here = slots.to(k.device)
            k.index_fill_(1, here, 0)
            v.index_fill_(1, here, 0)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.pools)
