"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured on first use.

A decode step of a 7B model is hundreds of kernel launches; launched one by one from Python, the host is
slower than the GPU. A graph replays the whole step with one launch. Each bucket's graph reads its inputs
from fixed buffers (tokens, positions, write slots, block tables of the longest possible request, lengths);
a batch smaller than its bucket is padded with rows that write into the padding block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .forward import LlamaFamilyForward, decode_inputs
from .scheduler import Sequence

BUCKETS = (1, 2, 4, 8, 16, 32)


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
