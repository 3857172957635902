"""Decode steps and prompts' first chunks replayed from CUDA graphs: one graph per size bucket.

A decode step of a 7B model is hundreds of kernel launches; launched one by one from Python, the host is
slower than the GPU. A graph replays the whole step with one launch. Each bucket's graph reads its inputs
from fixed buffers (tokens, positions, write slots, block tables of the longest possible request, lengths);
a batch smaller than its bucket is padded with rows that write into the padding block.

The same holds for reading a short prompt (a 512-token chunk of a 7B model: ~29 ms of host time for ~14 ms
of GPU work, measured on an H100): a request's first chunk, alone in its step, replays a graph per length
bucket, padded at the end (causal attention keeps the padding out of the real rows).

A model split across devices has one decode graph per segment (a graph belongs to one device) for each bucket:
each segment's graph reads the previous one's hidden states, copied into its input buffers between replays.
A segment on the CPU runs eagerly in between. Its prompts are read eagerly (no prefill graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..transfer import copy_in
from .forward import Feed, LlamaFamilyForward, Segment, decode_inputs
from .scheduler import Sequence

BUCKETS = (1, 2, 4, 8, 16, 32)
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)  # longer first chunks run eagerly: there the GPU is the bound


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    logits: torch.Tensor


@dataclass
class _SegmentGraph:
    graph: torch.cuda.CUDAGraph | None  # None: a CPU segment, run eagerly
    inputs: tuple[torch.Tensor, ...]  # (tokens or h, [delta], positions, write, tables, lengths) on its device
    outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None  # (h, delta), or the logits on the last
    packed: torch.Tensor | None = None  # a GPU segment's integer inputs, all in one buffer (see `pack`)


def pack(values: list[torch.Tensor]) -> torch.Tensor:
    """A decode step's integer inputs (tokens, positions, write slots, block tables, lengths) as one byte
    buffer: one copy to the device a step instead of five, each of which the GPU would order between kernels."""
    return torch.cat([v.reshape(-1).view(torch.uint8) for v in values])


def unpack(packed: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `packed` with the dtypes and shapes of `like`, in `pack`'s order."""
    views, at = [], 0
    for t in like:
        n = t.numel() * t.element_size()
        views.append(packed[at : at + n].view(t.dtype).view(t.shape))
        at += n
    return views


class GraphedDecode:
    def __init__(self, forward: LlamaFamilyForward, max_batch: int):
        self.forward = forward
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.captured: dict[int, list[_SegmentGraph]] = {}
        self.pools: dict[torch.device, object] = {}  # one graph memory pool per device

    @property
    def pool(self):
        """The memory pool of the first device's graphs (the prefill graphs share it)."""
        return self.pools.get(self.forward.device)

    def capture_all(self) -> None:
        for rows in self.buckets:
            if rows not in self.captured:
                self._capture(rows)

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    @torch.inference_mode()
    def __call__(self, batch: list[Sequence], feed: Feed | None = None) -> torch.Tensor:
        """The logits of one decode step ([batch, vocab]); `feed`: rows whose input token is on the device."""
        fwd = self.forward
        rows = self.bucket(len(batch))
        entries = self.captured.get(rows) or self._capture(rows)
        host = decode_inputs(batch, fwd.cache.block_size, rows=rows, table_width=fwd.table_width)
        tokens, *rest = host
        packed = None
        carried: tuple[torch.Tensor, ...] = (tokens,)  # what the next segment reads: tokens, then (h, delta)
        for seg, entry in zip(fwd.segments, entries):
            if entry.graph is None:  # a CPU segment
                here = [t.to(seg.device) for t in (*carried, *rest)]
                if seg.first and feed is not None:
                    feed.apply(here[0])
                out = fwd.decode_segment(seg, here[0], here[1] if len(carried) == 2 else None, *here[len(carried) :])
            else:
                packed = pack(host) if packed is None else packed
                copy_in(entry.packed, packed)
                if not seg.first:  # the previous segment's hidden states
                    for buffer, value in zip(entry.inputs[:2], carried):
                        buffer.copy_(value, non_blocking=True)
                if seg.first and feed is not None:
                    feed.apply(entry.inputs[0])
                entry.graph.replay()
                out = entry.outputs
            if seg.last:
                return out[: len(batch)]
            carried = out
        raise AssertionError("no segment holds the head")

    def _capture(self, rows: int) -> list[_SegmentGraph]:
        fwd = self.forward
        host = decode_inputs([], fwd.cache.block_size, rows, fwd.table_width)
        hidden = fwd.model.config.hidden_size
        entries = []
        for seg in fwd.segments:
            if seg.first:
                carried = (host[0],)
            else:
                carried = tuple(torch.zeros(rows, hidden, dtype=fwd.dtype) for _ in range(2))
            if seg.device.type != "cuda":
                entries.append(_SegmentGraph(None, tuple(t.to(seg.device) for t in (*carried, *host[1:])), None))
                continue
            packed = pack(host).to(seg.device)
            ints = unpack(packed, host)
            inputs = (*(ints[:1] if seg.first else [t.to(seg.device) for t in carried]), *ints[1:])
            entries.append(self._capture_segment(seg, inputs, packed))
        self.captured[rows] = entries
        return entries

    def _capture_segment(self, seg: Segment, inputs: tuple[torch.Tensor, ...], packed: torch.Tensor) -> _SegmentGraph:
        fwd = self.forward

        def step():
            if seg.first:
                return fwd.decode_segment(seg, inputs[0], None, *inputs[1:])
            return fwd.decode_segment(seg, inputs[0], inputs[1], *inputs[2:])

        if seg.device not in self.pools:
            self.pools[seg.device] = torch.cuda.graph_pool_handle()
        graph, outputs = capture(step, seg.device, self.pools[seg.device])
        return _SegmentGraph(graph, inputs, outputs, packed)


def capture(step, device: torch.device, pool) -> tuple[torch.cuda.CUDAGraph, object]:
    """A CUDA graph of `step()` (which reads and writes fixed buffers) and the outputs it writes.

    Two warm-up calls on a side stream first: kernels pick their configurations and scratch buffers grow
    outside the capture. The capture is thread-local: another thread's CUDA call (a model being freed, another
    engine) must not end it."""
    with torch.inference_mode(), torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = step()
    return graph, outputs


class GraphedPrefill:
    """First chunks of prompts (start 0, at most the largest bucket's tokens), one request at a time."""

    def __init__(self, forward: LlamaFamilyForward, pool=None, buckets: tuple[int, ...] = PREFILL_BUCKETS):
        self.forward = forward
        limit = forward.max_positions
        # a model split across devices reads its prompts eagerly: a graph belongs to one device
        self.buckets = [] if forward.split else [b for b in buckets if b <= limit]
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
        copy_in(tokens, torch.cat([seq.context[:end], torch.zeros(pad, dtype=torch.long)]))
        copy_in(positions, torch.cat([torch.arange(end), torch.zeros(pad, dtype=torch.long)]))
        copy_in(write, torch.cat([fwd.slots(seq, 0, end), torch.zeros(pad, dtype=torch.long)]))
        last.fill_(end - 1)
        entry.graph.replay()
        return entry.logits[0]

    def _capture(self, n: int) -> _Captured:
        fwd = self.forward
        zeros = torch.zeros(n, dtype=torch.long, device=fwd.device)
        inputs = (zeros, zeros.clone(), zeros.clone(), torch.zeros(1, dtype=torch.long, device=fwd.device))
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph, logits = capture(lambda: fwd.first_chunk_on(*inputs), fwd.device, self.pool)
        entry = self.captured[n] = _Captured(graph, inputs, logits)
        return entry
