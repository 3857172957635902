"""The small steps between the GEMMs of a decoder layer, each as one Triton kernel on CUDA.

A 7B decode step in plain torch ops is ~40 tiny kernels a layer around the 4 GEMMs (norms, rotary,
cache writes, the activation, residual adds); even replayed from a CUDA graph each costs 1-3 us, which
added up to more than half of the step on an H100. Here each is one kernel:

- `add_rms_norm`: the residual add and the next RMSNorm (fp32 statistics, as transformers computes them),
  written in the next layer's input order where its rows are sorted by group (act_order.py);
- `rope_store`: rotary embedding of q and k, and the write of k and v into the paged cache;
- `silu_mul`: the MLP's activation times its up projection.

`TorchOps` does the same with torch ops: the CPU path, and the reference the kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


class TorchOps:
    @staticmethod
    def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, order=None):
        """(h + delta, rmsnorm(h + delta) * weight); with delta None, h is only normed. With `order`, the normed
        features come out in that order (feature j is feature order[j]): the next layer's rows are in it."""
        if delta is not None:
            h = h + delta
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * x.to(h.dtype)
        return h, out if order is None else out.index_select(-1, order)

    @staticmethod
    def rope_store(q, k, v, cos, sin, write, k_cache, v_cache):
        """q and k rotated ([N, heads, D] each); k and v written into the cache slots `write`. Returns q."""
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k_cache.index_copy_(0, write, k)
        v_cache.index_copy_(0, write, v)
        return q

    @staticmethod
    def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split layout Llama checkpoints use. x [N, heads, D], cos/sin [N, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


if triton is not None:

    @triton.jit
    def _add_rms_norm(
        h_ptr,
        d_ptr,
        w_ptr,
        order_ptr,
        out_ptr,
        n,
        eps,
        stride_h,
        stride_d,
        stride_o,
        HAS_DELTA: tl.constexpr,
        HAS_ORDER: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0)
        if HAS_DELTA:
            h = h + tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0)  # fp16 add, as torch's
        if HAS_ORDER:  # the same sums read again in the output's order, before h is written over
            src = tl.load(order_ptr + cols, mask=mask, other=0)
            h_out = tl.load(h_ptr + row * stride_h + src, mask=mask, other=0.0)
            if HAS_DELTA:
                h_out = h_out + tl.load(d_ptr + row * stride_d + src, mask=mask, other=0.0)
            w = tl.load(w_ptr + src, mask=mask, other=0.0)
            tl.debug_barrier()  # every read of h is done before any thread stores into it
        else:
            h_out = h
            w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        if HAS_DELTA:
            tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
        x = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        tl.store(out_ptr + row * stride_o + cols, w * (h_out.to(tl.float32) * rstd).to(w.dtype), mask=mask)

    @triton.jit
    def _rope_store(
        q_ptr,
        k_ptr,
        v_ptr,
        cos_ptr,
        sin_ptr,
        write_ptr,
        kc_ptr,
        vc_ptr,
        stride_qn,
        stride_kn,
        stride_vn,
        stride_cn,
        stride_cs,
        HEADS: tl.constexpr,
        KV_HEADS: tl.constexpr,
        HALF: tl.constexpr,
    ):
        t = tl.program_id(0)
        hd = tl.program_id(1)  # heads, then kv heads
        d = tl.arange(0, HALF)
        cos1 = tl.load(cos_ptr + t * stride_cn + d).to(tl.float32)
        cos2 = tl.load(cos_ptr + t * stride_cn + HALF + d).to(tl.float32)
        sin1 = tl.load(sin_ptr + t * stride_cn + d).to(tl.float32)
        sin2 = tl.load(sin_ptr + t * stride_cn + HALF + d).to(tl.float32)
        if hd < HEADS:
            base = q_ptr + t * stride_qn + hd * 2 * HALF
            x1 = tl.load(base + d).to(tl.float32)
            x2 = tl.load(base + HALF + d).to(tl.float32)
            tl.store(base + d, (x1 * cos1 - x2 * sin1).to(q_ptr.dtype.element_ty))
            tl.store(base + HALF + d, (x2 * cos2 + x1 * sin2).to(q_ptr.dtype.element_ty))
        else:
            h = hd - HEADS
            slot = tl.load(write_ptr + t).to(tl.int64)
            base = k_ptr + t * stride_kn + h * 2 * HALF
            x1 = tl.load(base + d).to(tl.float32)
            x2 = tl.load(base + HALF + d).to(tl.float32)
            out = kc_ptr + slot * stride_cs + h * 2 * HALF
            tl.store(out + d, (x1 * cos1 - x2 * sin1).to(kc_ptr.dtype.element_ty))
            tl.store(out + HALF + d, (x2 * cos2 + x1 * sin2).to(kc_ptr.dtype.element_ty))
            vbase = v_ptr + t * stride_vn + h * 2 * HALF
            vout = vc_ptr + slot * stride_cs + h * 2 * HALF
            tl.store(vout + d, tl.load(vbase + d))
            tl.store(vout + HALF + d, tl.load(vbase + HALF + d))

    @triton.jit
    def _silu_mul(g_ptr, u_ptr, out_ptr, n, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0)
        act = (g / (1.0 + tl.exp(-g))).to(u.dtype)  # rounded as torch's fp16 silu is, before the product
        tl.store(out_ptr + row * stride_o + cols, act * u, mask=mask)


class TritonOps:
    @staticmethod
    def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, order=None):
        """As TorchOps.add_rms_norm (the gather into `order` in the same kernel); h is updated in place (it is
        the residual stream)."""
        n_rows, n = h.shape
        out = torch.empty_like(h)
        d = delta if delta is not None else h
        _add_rms_norm[(n_rows,)](
            h,
            d,
            weight,
            order if order is not None else weight,
            out,
            n,
            eps,
            h.stride(0),
            d.stride(0),
            out.stride(0),
            HAS_DELTA=delta is not None,
            HAS_ORDER=order is not None,
            BLOCK=triton.next_power_of_2(n),
        )
        return h, out

    @staticmethod
    def rope_store(q, k, v, cos, sin, write, k_cache, v_cache):
        """As TorchOps.rope_store; q is rotated in place. q, k, v may be column slices of one fused output."""
        n, heads, dim = q.shape
        kv_heads = k.shape[1]
        assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and q.stride(1) == k.stride(1) == v.stride(1) == dim
        _rope_store[(n, heads + kv_heads)](
            q,
            k,
            v,
            cos,
            sin,
            write,
            k_cache,
            v_cache,
            q.stride(0),
            k.stride(0),
            v.stride(0),
            cos.stride(0),
            k_cache.stride(0),
            HEADS=heads,
            KV_HEADS=kv_heads,
            HALF=dim // 2,
        )
        return q

    @staticmethod
    def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        n_rows, n = gate.shape
        out = torch.empty(n_rows, n, dtype=up.dtype, device=up.device)
        block = 1024
        _silu_mul[(n_rows, triton.cdiv(n, block))](
            gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0), BLOCK=block
        )
        return out
