"""Decode attention straight from the paged cache, as one Triton kernel plus a small combine.

Each program takes one request, one KV head and one slice of the request's blocks: it loads the query rows
of every head that shares that KV head (grouped-query attention reads each key once, not once per head),
walks its blocks through the block table, and keeps a running softmax. The slices (flash-decoding) give the
GPU enough programs when the batch is small; their partial results are combined with torch ops.

Loop bounds come from the lengths on the device, never from the host: the launch has the same shape at
every step, so it can be captured in a CUDA graph. Slots past a request's length are never read.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path does not need it
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _paged_decode(
        q_ptr,
        k_ptr,
        v_ptr,
        tables_ptr,
        lengths_ptr,
        o_ptr,
        m_ptr,
        l_ptr,
        scale,
        window,
        table_width,
        splits,
        stride_qb,
        stride_qh,
        stride_ks,
        stride_kh,
        stride_ob,
        stride_oh,
        stride_os,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        length = tl.load(lengths_ptr + b)
        n_blocks = tl.cdiv(length, BLOCK)
        per_split = tl.cdiv(n_blocks, splits)
        first = s * per_split
        last = tl.minimum(first + per_split, n_blocks)
        if window > 0:  # sliding-window models: blocks wholly before the window are skipped
            first = tl.maximum(first, (length - window) // BLOCK)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        t = tl.arange(0, BLOCK)
        heads = kvh * GROUP + g
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0
        )
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for j in range(first, last):
            block = tl.load(tables_ptr + b * table_width + j).to(tl.int64)
            slots = block * BLOCK + t
            k = tl.load(k_ptr + slots[:, None] * stride_ks + kvh * stride_kh + d[None, :])
            v = tl.load(v_ptr + slots[:, None] * stride_ks + kvh * stride_kh + d[None, :])
            scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            pos = j * BLOCK + t
            valid = pos < length
            if window > 0:
                valid = valid & (pos > length - 1 - window)
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new
        out = o_ptr + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + d[None, :]
        tl.store(out, acc, mask=(g < GROUP)[:, None])
        ml = b * (stride_ob // HEAD_DIM) + heads * (stride_oh // HEAD_DIM) + s
        tl.store(m_ptr + ml, m_i, mask=g < GROUP)
        tl.store(l_ptr + ml, l_i, mask=g < GROUP)


if triton is not None:

    @triton.jit
    def _combine(
        o_ptr,
        m_ptr,
        l_ptr,
        out_ptr,
        scatter_ptr,
        splits,
        stride_ob,
        stride_oh,
        stride_os,
        stride_outb,
        SPLITS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        SCATTER: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, HEAD_DIM)
        ml = b * (stride_ob // HEAD_DIM) + h * (stride_oh // HEAD_DIM) + s
        m = tl.load(m_ptr + ml, mask=s < splits, other=float("-inf"))
        lsum = tl.load(l_ptr + ml, mask=s < splits, other=0.0)
        w = tl.exp(m - tl.max(m, 0))  # empty slices have m = -inf: weight 0
        o = tl.load(
            o_ptr + b * stride_ob + h * stride_oh + s[:, None] * stride_os + d[None, :],
            mask=(s < splits)[:, None],
            other=0.0,
        )
        out = tl.sum(o * w[:, None], 0) / tl.sum(lsum * w, 0)
        col = h * HEAD_DIM + d
        if SCATTER:  # each feature to its column in the next layer's input order
            col = tl.load(scatter_ptr + col)
        tl.store(out_ptr + b * stride_outb + col, out.to(out_ptr.dtype.element_ty))


def choose_splits(batch: int, kv_heads: int, table_width: int, programs: int = 264) -> int:
    """Slices per request so that the launch has about `programs` programs (two per SM on an H100)."""
    return max(1, min(table_width, -(-programs // (batch * kv_heads))))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    window: int | None,
    splits: int,
    block_size: int,
    scatter: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, heads, D]; one layer's cache [slots, kv_heads, D]; tables [B, W] int32; lengths [B] int32 -> [B, heads, D].
    scatter (int32 [heads * D]): feature f of a row is written at column scatter[f] of its flattened output."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    q = q.contiguous()
    o = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
    m = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    lsum = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    grid = (batch, kv_heads, splits)
    _paged_decode[grid](
        q,
        k_cache,
        v_cache,
        tables,
        lengths,
        o,
        m,
        lsum,
        scale,
        window or 0,
        tables.shape[1],
        splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        o.stride(0),
        o.stride(1),
        o.stride(2),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK=block_size,
        HEAD_DIM=dim,
    )
    out = torch.empty_like(q)
    _combine[(batch, heads)](
        o,
        m,
        lsum,
        out,
        scatter if scatter is not None else lengths,
        splits,
        o.stride(0),
        o.stride(1),
        o.stride(2),
        out.stride(0),
        SPLITS=triton.next_power_of_2(splits),
        HEAD_DIM=dim,
        SCATTER=scatter is not None,
    )
    return out
