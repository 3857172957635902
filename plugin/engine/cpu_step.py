"""The decode step on the CPU: the same layers as `LlamaFamilyForward.run_segment`, in fewer torch ops.

On a CPU a decode step of a small model is mostly small ops: SmolLM2-135M's step was ~2,500 of them at 1-10 us
each, as long as all its 4-bit matmuls together. Every op here is dispatched from Python one by one, so the
step is written for the fewest ops that keep the float32 arithmetic of the torch path:

- the RMSNorm writes its output in the dtype the next matmul reads (bfloat16 for `cpu-int4`: that kernel would
  round its input to bfloat16 anyway), and a `cpu-int4` matmul calls torch's packed op directly;
- the residual add takes the matmul's bfloat16 output as is (the add widens it, as `.to(float32)` would);
- rotary embedding of q and k together in three ops (x * cos + flip(x) * signed sin), with the position's
  tables gathered once a step for every layer;
- attention one request at a time over a view of its own cache slots (its blocks are consecutive unless the
  pool was fragmented; then they are gathered), one `scaled_dot_product_attention` with no mask: a request's
  result is the same op on the same numbers whether it decodes alone or beside others;
- the head: an int8 head (head.py) calls its op directly.

Layers the fast paths do not know (other kernels, unfused projections, biases) run through their modules.

What lies between two attentions (o projection, MLP, the next layer's norm, q/k/v and rotary) is still ~25 ops a
layer; where every layer is a plain `cpu-int4` layer, cpu_compiled.py compiles that stretch once per machine
into one call (in the background; until it is ready, and where it cannot be built, the ops run one by one).
The compiled and the op-by-op stretch are the same functions below, `between` in both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..fusion import FusedLinear
from ..head import Int8Head
from ..kernels.cpu_int4 import BLOCK, COMPUTE, CpuInt4Linear

Matmul = Callable[[torch.Tensor], torch.Tensor]


def linear_call(module: torch.nn.Module, dtype: torch.dtype) -> tuple[Matmul, torch.dtype]:
    """(a function of the 2-D input, the dtype it wants): `cpu-int4` layers call the packed op on bfloat16 rows
    and return bfloat16 (plus the bias, in `dtype`); anything else is the module itself, in the model's dtype."""
    if type(module) is CpuInt4Linear and module.weights is not None:
        packed, scale_zero = module.weights.packed, module.weights.scale_zero
        source, bias = module.source, module.bias
        op = torch.ops.aten._weight_int4pack_mm_for_cpu

        if source is None and bias is None:

            def call(x: torch.Tensor) -> torch.Tensor:
                return op(x, packed, BLOCK, scale_zero)

        else:

            def call(x: torch.Tensor) -> torch.Tensor:
                if source is not None:
                    x = F.pad(x, (0, 1)).index_select(-1, source)
                out = op(x, packed, BLOCK, scale_zero)
                return out if bias is None else out.to(dtype) + bias

        return call, COMPUTE
    return module, dtype


def norm_to(h: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm as transformers computes it (float32 statistics, then the weight), in `dtype`."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if x.dtype != h.dtype:
        x = x.to(h.dtype)
    out = weight * x
    return out if out.dtype == dtype else out.to(dtype)


def rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """q and k of a fused q/k/v output ([n, (heads + 2 kv_heads) D]) rotated: [n, heads + kv_heads, D].
    cos [n, 1, D]; sin [n, 1, 2, D/2] with rotate_half's signs in it: x * cos + flip(halves of x) * sin."""
    n, d = qkv.shape[0], cos.shape[-1]
    qk = qkv[:, : (heads + kv_heads) * d].view(n, heads + kv_heads, d)
    turned = qk.view(n, heads + kv_heads, 2, d // 2).flip(-2) * sin
    return torch.addcmul(turned.view(n, heads + kv_heads, d), qk, cos)


def values(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    return qkv[:, (heads + kv_heads) * head_dim :].view(qkv.shape[0], kv_heads, head_dim)


def gated(gate_up: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SiLU(gate) * up of a fused gate/up output, computed in its dtype, returned in `dtype`."""
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate) * up
    return act if act.dtype == dtype else act.to(dtype)


@dataclass
class LayerCalls:
    in_norm: tuple[torch.Tensor, float]
    post_norm: tuple[torch.Tensor, float]
    qkv: Matmul
    qkv_dtype: torch.dtype
    o: Matmul
    o_dtype: torch.dtype
    gate_up: Matmul
    gate_up_dtype: torch.dtype
    down: Matmul
    down_dtype: torch.dtype


def between(h, attn, c: LayerCalls, nxt: LayerCalls | None, cos, sin, heads: int, kv_heads: int, dtype):
    """From a layer's attention output ([n, heads * D], in `dtype`) to the next layer's rotated q and k and its v:
    (h, qk, v); after the last layer (`nxt` None) h only, with qk and v None."""
    h = h + c.o(attn if c.o_dtype == dtype else attn.to(c.o_dtype))
    h = h + c.down(gated(c.gate_up(norm_to(h, *c.post_norm, c.gate_up_dtype)).to(dtype), c.down_dtype))
    if nxt is None:
        return h, None, None
    qkv = nxt.qkv(norm_to(h, *nxt.in_norm, nxt.qkv_dtype)).to(dtype)
    return h, rotary(qkv, cos, sin, heads, kv_heads), values(qkv, heads, kv_heads, cos.shape[-1])


def _projections(part: torch.nn.Module, fused_name: str, names: tuple[str, ...], dtype) -> tuple[Matmul, torch.dtype]:
    """One function for several projections of the same input: their outputs side by side ([n, sum of widths])."""
    fused = getattr(part, fused_name, None)
    if isinstance(fused, FusedLinear):
        if fused.input_order is None:
            return linear_call(fused.linear, dtype)
        return (lambda x: torch.cat(fused(x), dim=-1)), dtype  # rows in group order: forward gathers x
    modules = [getattr(part, n) for n in names]

    def call(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in modules], dim=-1)

    return call, dtype


class CpuDecode:
    """The decode step of one segment on the CPU (built once, at the first step)."""

    def __init__(self, fwd, seg):
        self.fwd, self.seg = fwd, seg
        dtype = self.dtype = fwd.dtype
        self.calls = []
        self.int4_layers = []  # per layer, its four cpu-int4 matmuls where all are plain (no bias, no gather)
        for i in range(seg.start, seg.end):
            layer = fwd.layers[i]
            attn, mlp = layer.self_attn, layer.mlp
            qkv, qkv_dtype = _projections(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"), dtype)
            gate_up, gate_up_dtype = _projections(mlp, "gate_up_proj", ("gate_proj", "up_proj"), dtype)
            o, o_dtype = linear_call(attn.o_proj, dtype)
            down, down_dtype = linear_call(mlp.down_proj, dtype)
            norms = [(n.weight, n.variance_epsilon) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
            self.calls.append(LayerCalls(*norms, qkv, qkv_dtype, o, o_dtype, gate_up, gate_up_dtype, down, down_dtype))
            linears = [getattr(attn, "qkv_proj", None), attn.o_proj, getattr(mlp, "gate_up_proj", None), mlp.down_proj]
            linears = [m.linear if isinstance(m, FusedLinear) and m.input_order is None else m for m in linears]
            plain = all(type(m) is CpuInt4Linear and m.weights is not None for m in linears)
            self.int4_layers.append(
                linears if plain and all(m.source is None and m.bias is None for m in linears) else None
            )
        head = fwd.model.lm_head
        self.head_int8 = seg.last and type(head) is Int8Head and head.bias is None
        self.head_dtype = COMPUTE if self.head_int8 else dtype
        half = fwd.head_dim // 2
        self.cos = seg.cos
        self.sin = torch.cat([-seg.sin[:, :half], seg.sin[:, half:]], dim=-1)  # rotate_half's signs folded in
        # per layer, keys and values as [kv_heads, slots, head_dim] views: a request's slots are a slice of them
        self.k = [fwd.cache.k[i].transpose(0, 1) for i in range(seg.start, seg.end)]
        self.v = [fwd.cache.v[i].transpose(0, 1) for i in range(seg.start, seg.end)]
        self.compiled = None
        if all(self.int4_layers) and len(self.calls) > 1:
            from . import cpu_compiled

            self.compiled = cpu_compiled.for_step(self)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One request's attention: q [kv_heads, group, D] over k, v [kv_heads, L, D]."""
        # 4-D: torch's CPU flash attention (3-D inputs take its slower math path)
        return F.scaled_dot_product_attention(q[None], k[None], v[None], scale=self.fwd.scale)[0]

    def reads(self, tables: torch.Tensor, lengths: torch.Tensor) -> list[slice | torch.Tensor]:
        """Per request, the cache slots it attends to: a slice where its blocks are consecutive, else the slots."""
        bs, window = self.fwd.cache.block_size, self.fwd.window
        out: list[slice | torch.Tensor] = []
        for table, length in zip(tables.tolist(), lengths.tolist()):
            first = 0 if window is None else max(0, length - window)
            used = table[: -(-length // bs)]
            if used == list(range(used[0], used[0] + len(used))):
                out.append(slice(used[0] * bs + first, used[0] * bs + length))
            else:
                slots = torch.tensor(used, dtype=torch.long)[:, None] * bs + torch.arange(bs)
                out.append(slots.flatten()[first:length])
        return out

    def attention(self, j: int, qk: torch.Tensor, v: torch.Tensor, write: torch.Tensor, reads) -> torch.Tensor:
        """Layer j (of the segment): k and v into the cache, then each request's attention: [n, heads * D]."""
        fwd = self.fwd
        heads, kv_heads, head_dim = fwd.heads, fwd.kv_heads, fwd.head_dim
        n, i = qk.shape[0], self.seg.start + j
        k_cache, v_cache = fwd.cache.k[i], fwd.cache.v[i]
        k_cache.index_copy_(0, write, qk[:, heads:])
        v_cache.index_copy_(0, write, v)
        q = qk[:, :heads].view(n, kv_heads, heads // kv_heads, head_dim)
        keys, vals = self.k[j], self.v[j]
        rows = []
        for r, read in enumerate(reads):
            if isinstance(read, slice):
                k, v = keys[:, read], vals[:, read]
            else:
                k, v = k_cache.index_select(0, read).transpose(0, 1), v_cache.index_select(0, read).transpose(0, 1)
            rows.append(self.attend(q[r], k, v))
        return rows[0].reshape(1, heads * head_dim) if n == 1 else torch.stack(rows).reshape(n, heads * head_dim)

    def __call__(self, x, delta, positions, write, tables, lengths):
        fwd, seg, dtype = self.fwd, self.seg, self.dtype
        heads, kv_heads, head_dim = fwd.heads, fwd.kv_heads, fwd.head_dim
        h = fwd.embed(x) if seg.first else x
        if delta is not None:
            h = h + delta
        n = h.shape[0]
        cos = self.cos[positions][:, None]  # [n, 1, D]: every head of q and k
        sin = self.sin[positions][:, None].view(n, 1, 2, head_dim // 2)
        reads = self.reads(tables, lengths)
        runner = self.compiled.runner() if self.compiled is not None else None
        c = self.calls[0]
        qkv = c.qkv(norm_to(h, *c.in_norm, c.qkv_dtype)).to(dtype)
        qk, v = rotary(qkv, cos, sin, heads, kv_heads), values(qkv, heads, kv_heads, head_dim)
        last = len(self.calls) - 1
        for j, c in enumerate(self.calls):
            attn = self.attention(j, qk, v, write, reads)
            if runner is not None and j < last:
                h, qk, v = runner(h, attn, *self.compiled.inputs[j], cos, sin)
            else:
                h, qk, v = between(
                    h, attn, c, self.calls[j + 1] if j < last else None, cos, sin, heads, kv_heads, dtype
                )
        if not seg.last:
            return h, torch.zeros_like(h)
        out = norm_to(h, fwd.norm.weight, fwd.norm.variance_epsilon, self.head_dtype)
        if self.head_int8:
            head = fwd.model.lm_head
            return torch.ops.aten._weight_int8pack_mm(out, head.q, head.scales).float()
        return fwd.model.lm_head(out[None]).float()[0]
