"""Decode steps and prompts' first chunks replayed from CUDA graphs: one graph per size bucket.

A decode step of a 7B model is hundreds of kernel launches; launched one by one from Python, the host is
slower than the GPU. A graph replays the whole step with one launch. Each bucket's graph reads its inputs
from fixed buffers (tokens, positions, write slots, block tables of the longest possible request, lengths);
a batch smaller than its bucket is padded with rows that write into the padding block.

The same holds for reading a short prompt (a 512-token chunk of a 7B model: ~29 ms of host time for ~14 ms
of GPU work, measured on an H100): a request's first chunk, alone in its step, replays a graph per length
bucket, padded at the end (causal attention keeps the padding out of the real rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .forward import LlamaFamilyForward, decode_inputs
from .scheduler import Sequence

BUCKETS = (1, 2, 4, 8, 16, 32)
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)  # longer first chunks run eagerly: there the GPU is the bound


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    logits: torch.Tensor


class GraphedDecode:
    def __init__(self, forward: LlamaFamilyForward, max_batch: int):
        self.forward = forward
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.captured: dict[int, _Captured] = {}
        self.pool = None

    def capture_all(self) -> None:
        for rows in self.buckets:
            if rows not in self.captured:
                self._capture(rows)

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    @torch.inference_mode()
    def __call__(self, batch: list[Sequence]) -> torch.Tensor:
        rows = self.bucket(len(batch))
        entry = self.captured.get(rows) or self._capture(rows)
        host = decode_inputs(batch, self.forward.cache.block_size, rows=rows, table_width=self.forward.table_width)
        for buffer, value in zip(entry.inputs, host):
            buffer.copy_(value, non_blocking=True)
        entry.graph.replay()
        return entry.logits[: len(batch)]

    def _capture(self, rows: int) -> _Captured:
        fwd = self.forward
        inputs = tuple(t.to(fwd.device) for t in decode_inputs([], fwd.cache.block_size, rows, fwd.table_width))
        side = torch.cuda.Stream(fwd.device)
        side.wait_stream(torch.cuda.current_stream(fwd.device))
        with torch.cuda.stream(side):  # warm-up: kernels pick their configs and scratch grows outside the capture
            for _ in range(2):
                fwd.decode_on(*inputs)
        torch.cuda.current_stream(fwd.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA call (a model being freed, another engine) must not end the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = fwd.decode_on(*inputs)
        entry = self.captured[rows] = _Captured(graph, inputs, logits)
        return entry


class GraphedPrefill:
    """First chunks of prompts (start 0, at most the largest bucket's tokens), one request at a time."""

    def __init__(self, forward: LlamaFamilyForward, pool=None, buckets: tuple[int, ...] = PREFILL_BUCKETS):
        self.forward = forward
        limit = forward.max_positions
        self.buckets = [b for b in buckets if b <= limit]
        self.captured: dict[int, _Captured] = {}
        self.pool = pool

    def capture_all(self) -> None:
        for n in self.buckets:
            if n not in self.captured:
                self._capture(n)

    def serves(self, seq: Sequence, start: int, end: int) -> bool:
        return start == 0 and bool(self.buckets) and end <= self.buckets[-1]

    @torch.inference_mode()
    def __call__(self, seq: Sequence, end: int) -> torch.Tensor:
        """The logits after prompt token end - 1 ([vocab], float32), having read tokens [0, end)."""
        n = next(b for b in self.buckets if b >= end)
        entry = self.captured.get(n) or self._capture(n)
        fwd, pad = self.forward, n - end
        tokens, positions, write, last = entry.inputs
        tokens.copy_(torch.cat([seq.context[:end], torch.zeros(pad, dtype=torch.long)]), non_blocking=True)
        positions.copy_(torch.cat([torch.arange(end), torch.zeros(pad, dtype=torch.long)]), non_blocking=True)
        write.copy_(torch.cat([fwd.slots(seq, 0, end), torch.zeros(pad, dtype=torch.long)]), non_blocking=True)
        last.fill_(end - 1)
        entry.graph.replay()
        return entry.logits[0]

    def _capture(self, n: int) -> _Captured:
        fwd = self.forward
        zeros = torch.zeros(n, dtype=torch.long, device=fwd.device)
        inputs = (zeros, zeros.clone(), zeros.clone(), torch.zeros(1, dtype=torch.long, device=fwd.device))
        side = torch.cuda.Stream(fwd.device)
        side.wait_stream(torch.cuda.current_stream(fwd.device))
        with torch.inference_mode(), torch.cuda.stream(side):  # warm-up outside the capture, as for decode
            for _ in range(2):
                fwd.first_chunk_on(*inputs)
        torch.cuda.current_stream(fwd.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = fwd.first_chunk_on(*inputs)
        entry = self.captured[n] = _Captured(graph, inputs, logits)
        return entry
