"""How glibc serves the quantizer's large host allocations while it runs (`heap_policy`), and when keeping
freed memory for reuse pays (`heap_reuse_pays`)."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def heap_policy(reuse: bool) -> Iterator[None]:
    """How glibc serves the quantizer's large host allocations while it runs; restored and trimmed afterwards.

    `reuse` (CPU runs with narrow layers, `heap_reuse_pays`): serve large allocations from the heap and keep
    freed memory. Every forward pass over the calibration set allocates and frees the same activation-sized
    tensors (tens of MB each). By default glibc gives each one back to the kernel (munmap) and maps fresh
    pages for the next, and every 4 KiB page of those is a page fault that zeroes it: for SmolLM2-135M
    (39 x 512 tokens) about 9 of 55 CPU seconds per 6 blocks were system time. With mmap off and trimming
    deferred, the memory is reused instead. The price is resident memory that is not given back during the
    run (peak RSS of the SmolLM2 benchmark: 2.2 GB -> 3.0 GB).

    Otherwise (wide layers, or a GPU run): a fixed mmap threshold at glibc's initial 128 KiB, so every
    tensor above it is mapped on its own and given back to the kernel when freed. glibc's default raises the
    threshold each time a mapped block is freed, up to 32 MiB, so after the first forward pass every tensor
    up to 32 MiB (Hessians, weight copies, activations) came from the heap, where short- and long-lived
    chunks interleave and the free space between them cannot be given back: the heap grew with every block
    while the memory in use did not (hidden 1024 / MLP 2752, 16 x 512 tokens: 163 MiB in use after every
    block, free heap memory 300 -> 550 MiB over 16 blocks, peak RSS +25 MiB per block; with the fixed
    threshold 1 -> 3 MiB free and a flat peak; docs/QUALITY.md). The cost is the page faults of those
    tensors: more system time.
    """
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            _ = libc.gnu_get_libc_version  # glibc only (mallopt's parameter numbers are glibc's)
        except (OSError, AttributeError):
            libc = None
    if libc is None:
        yield
        return
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
    if reuse:
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 2**31 - 1)
    else:
        libc.mallopt(m_mmap_threshold, GLIBC_MMAP_THRESHOLD)  # also turns glibc's dynamic threshold off
    try:
        yield
    finally:
        # glibc's default values; the threshold stays fixed at its initial value (mallopt cannot turn the
        # dynamic adjustment back on), which only means large blocks keep being mapped on their own
        libc.mallopt(m_mmap_max, 65536)
        libc.mallopt(m_mmap_threshold, GLIBC_MMAP_THRESHOLD)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        libc.malloc_trim(0)


# glibc's initial M_MMAP_THRESHOLD: allocations above it are mapped on their own (see `heap_policy`).
GLIBC_MMAP_THRESHOLD = 128 * 1024


# Widest Linear input for which keeping freed memory in the heap pays (see `heap_reuse_pays`).
HEAP_REUSE_MAX_WIDTH = 4096


def heap_reuse_pays(blocks: nn.ModuleList) -> bool:
    """Whether `heap_policy`'s heap reuse is worth its memory for these blocks.

    It saves the page faults of activation-sized tensors allocated again in every forward pass (SmolLM2,
    widths up to 1536: ~35 s of system time per run). With wider layers the float64 [in, in] Hessians and
    their factorisations (hundreds of MB to GB, a few per block) dominate the allocations, and a heap that
    never gives memory back fragments around them: measured at MLP width 5504, 3391 MiB with it against
    2737 MiB without, and at 11008 (Llama-2-7B's block) 9310 against 6279 MiB, for the same time per block.
    """
    widths = [m.in_features for m in blocks[0].modules() if isinstance(m, nn.Linear)]
    return bool(widths) and max(widths) <= HEAP_REUSE_MAX_WIDTH
