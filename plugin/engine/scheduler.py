"""Which requests run at the next step: admission by KV-cache blocks, prompt chunks, every decode.

Pure bookkeeping (no tensors, no model), so it is tested on its own. Each step:
1. requests cancelled since the last step leave, and their blocks are free again;
2. waiting requests are admitted first come, first served, while a batch row and their whole reservation
   (prompt + max_new_tokens) are free. The oldest waits until it fits; none behind it jumps the queue, so a
   long request is never starved by short ones;
3. admitted requests with prompt left to read get it, oldest first, up to `prefill_chunk` tokens in all
   (packed into one forward), so a long prompt holds the running streams back by one chunk per step, never by
   the whole prompt. With no stream decoding nobody waits on the chunk: up to `prefill_alone` tokens are read;
4. every request whose prompt is read decodes one token (unless the token in flight may be its last).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..sampling import Sampler
from .kv_cache import BlockAllocator, CacheBudgetError


@dataclass(eq=False)
class Sequence:
    """One request inside the engine: its tokens, its cache blocks, and where its tokens go."""

    prompt: list[int]
    max_new_tokens: int
    sample: Callable[[torch.Tensor, Sequence], int]  # logits of the last position -> next token
    sampler: Sampler | None = None  # when set, decode steps draw this row with the others' (sample_batch)
    end_ids: frozenset[int] = frozenset()  # tokens after which the request is done (EOS, stop tokens)
    greedy: bool = False  # argmax after bans, so a batch of such rows is sampled with one argmax
    banned: list[int] = field(default_factory=list)  # token ids a greedy row never picks
    cancel: threading.Event = field(default_factory=threading.Event)  # the engine's own: set to end the request
    caller_cancel: threading.Event | None = None  # the caller's, possibly shared by several requests
    deliver: Callable[[object], None] = lambda item: None  # receives each token id, then an `End`
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys and values are in the cache
    generated: int = 0
    pending: int = 0  # tokens drawn on the device that the host has not read yet (0 or 1)
    finish_reason: str | None = None

    def __post_init__(self):
        self.context = torch.empty(len(self.prompt) + self.max_new_tokens, dtype=torch.long)
        self.context[: len(self.prompt)] = torch.tensor(self.prompt, dtype=torch.long)
        self.length = len(self.prompt)  # prompt + generated tokens in `context`
        self.last = self.prompt[-1] if self.prompt else 0  # context[length - 1]: what a decode step reads
        self._table: tuple[tuple, torch.Tensor] | None = None  # (width, blocks) and the padded block table

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set() or (self.caller_cancel is not None and self.caller_cancel.is_set())

    @property
    def reserve_tokens(self) -> int:
        return len(self.prompt) + self.max_new_tokens

    @property
    def prefilled(self) -> bool:
        return self.cached >= len(self.prompt)

    def table_row(self, width: int) -> torch.Tensor:
        """The block table padded to `width` with the padding block 0 (int32), made once per set of blocks."""
        key = (width, tuple(self.blocks))
        if self._table is None or self._table[0] != key:
            row = torch.zeros(width, dtype=torch.int32)
            row[: len(self.blocks)] = torch.tensor(self.blocks, dtype=torch.int32)
            self._table = (key, row)
        return self._table[1]

    def append(self, token: int) -> None:
        self.context[self.length] = token
        self.last = token
        self.length += 1
        self.generated += 1


@dataclass(frozen=True)
class End:
    """The last item a sequence receives: why it ended (`length`, `eos`, `cancelled`) or the error it met."""

    reason: str
    error: BaseException | None = None


@dataclass
class Step:
    prefill: list[tuple[Sequence, int, int]] = field(default_factory=list)  # requests and prompt ranges to read
    decode: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # given cache blocks at this step

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(
        self, allocator: BlockAllocator, max_batch: int = 32, prefill_chunk: int = 512, prefill_alone: int = 2048
    ):
        self.allocator = allocator
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.prefill_alone = max(prefill_alone, prefill_chunk)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._lock = threading.Lock()

    def check(self, seq: Sequence) -> None:
        """Refuse a request that could never fit, even in an empty cache."""
        need = self.allocator.blocks_for(seq.reserve_tokens)
        if need > self.allocator.usable_blocks:
            holds = self.allocator.usable_blocks * self.allocator.block_size
            raise CacheBudgetError(
                f"kv_cache: this request needs {seq.reserve_tokens} tokens of cache (prompt {len(seq.prompt)} + "
                f"max_new_tokens {seq.max_new_tokens}), but the whole cache holds {holds}; "
                f"load the model with a larger kv_cache or ask for fewer tokens"
            )

    def submit(self, seq: Sequence) -> None:
        self.check(seq)
        with self._lock:
            self.waiting.append(seq)

    def pending(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running)

    def plan(self) -> tuple[Step, list[Sequence]]:
        """The next step, and the requests that were cancelled since the last one (already removed)."""
        with self._lock:
            cancelled = [s for s in self.waiting if s.cancelled] + [s for s in self.running if s.cancelled]
            for seq in cancelled:
                self._remove(seq, "cancelled")
            admitted = []
            while (
                self.waiting
                and len(self.running) < self.max_batch
                and self.allocator.can_allocate(self.waiting[0].reserve_tokens)
            ):
                seq = self.waiting.popleft()
                seq.blocks = self.allocator.allocate(seq.reserve_tokens)
                self.running.append(seq)
                admitted.append(seq)
            step = Step(admitted=admitted)
            # a request whose token in flight may be its last one is not run past it
            step.decode = [s for s in self.running if s.prefilled and s.generated + s.pending < s.max_new_tokens]
            budget = self.prefill_chunk if step.decode else self.prefill_alone
            for seq in self.running:
                if budget == 0:
                    break
                if not seq.prefilled:
                    end = min(seq.cached + budget, len(seq.prompt))
                    step.prefill.append((seq, seq.cached, end))
                    budget -= end - seq.cached
            return step, cancelled

    def finish(self, seq: Sequence, reason: str) -> None:
        with self._lock:
            self._remove(seq, reason)

    def fail_all(self) -> list[Sequence]:
        """Remove every request (after an error in a step); returns them so the engine can tell each."""
        with self._lock:
            seqs = list(self.waiting) + list(self.running)
            for seq in seqs:
                self._remove(seq, "error")
            return seqs

    def _remove(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.allocator.free(seq.blocks)
            seq.blocks = []
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.finish_reason = reason
