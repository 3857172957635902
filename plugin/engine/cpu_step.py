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


def _projections(part: torch.nn.Module, fused_name: str, names: tuple[str, ...], dtype) -> tuple[Matmul, torch.dtype]:
    """One function for several projections of the same input: their outputs side by side ([n, sum of widths])."""
    fused = getattr(part, fused_name, None)
    if isinstance(fused, FusedLinear):
        return linear_call(fused.linear, dtype)
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
        for i in range(seg.start, seg.end):
            layer = fwd.layers[i]
            attn, mlp = layer.self_attn, layer.mlp
            qkv, qkv_dtype = _projections(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"), dtype)
            gate_up, gate_up_dtype = _projections(mlp, "gate_up_proj", ("gate_proj", "up_proj"), dtype)
            o, o_dtype = linear_call(attn.o_proj, dtype)
            down, down_dtype = linear_call(mlp.down_proj, dtype)
            norms = [(n.weight, n.variance_epsilon) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
            self.calls.append(LayerCalls(*norms, qkv, qkv_dtype, o, o_dtype, gate_up, gate_up_dtype, down, down_dtype))
        head = fwd.model.lm_head
        self.head_int8 = seg.last and type(head) is Int8Head and head.bias is None
        self.head_dtype = COMPUTE if self.head_int8 else dtype
        half = fwd.head_dim // 2
        self.cos = seg.cos
        self.sin = torch.cat([-seg.sin[:, :half], seg.sin[:, half:]], dim=-1)  # rotate_half's signs folded in
        # per layer, keys and values as [kv_heads, slots, head_dim] views: a request's slots are a slice of them
        self.k = [fwd.cache.k[i].transpose(0, 1) for i in range(seg.start, seg.end)]
        self.v = [fwd.cache.v[i].transpose(0, 1) for i in range(seg.start, seg.end)]

    @staticmethod
    def norm(h: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
        """RMSNorm as transformers computes it (float32 statistics), in `dtype`."""
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if x.dtype != h.dtype:
            x = x.to(h.dtype)
        return torch.mul(weight, x).to(dtype) if dtype != x.dtype else weight * x

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

    def __call__(self, x, delta, positions, write, tables, lengths):
        fwd, seg, dtype = self.fwd, self.seg, self.dtype
        heads, kv_heads, head_dim = fwd.heads, fwd.kv_heads, fwd.head_dim
        group, scale = heads // kv_heads, fwd.scale
        qk_width = (heads + kv_heads) * head_dim
        h = fwd.embed(x) if seg.first else x
        if delta is not None:
            h = h + delta
        n = h.shape[0]
        cos = self.cos[positions][:, None]  # [n, 1, D]: every head of q and k
        sin = self.sin[positions][:, None].view(n, 1, 2, head_dim // 2)
        reads = self.reads(tables, lengths)
        for j, c in enumerate(self.calls):
            i = seg.start + j
            qkv = c.qkv(self.norm(h, *c.in_norm, c.qkv_dtype))
            if qkv.dtype != dtype:
                qkv = qkv.to(dtype)
            qk = qkv[:, :qk_width].view(n, heads + kv_heads, head_dim)
            turned = qk.view(n, heads + kv_heads, 2, head_dim // 2).flip(-2) * sin
            qk = torch.addcmul(turned.view(n, heads + kv_heads, head_dim), qk, cos)
            k_cache, v_cache = fwd.cache.k[i], fwd.cache.v[i]
            k_cache.index_copy_(0, write, qk[:, heads:])
            v_cache.index_copy_(0, write, qkv[:, qk_width:].view(n, kv_heads, head_dim))
            q = qk[:, :heads].view(n, kv_heads, group, head_dim)
            keys, values = self.k[j], self.v[j]
            rows = []
            for r, read in enumerate(reads):
                if isinstance(read, slice):
                    k, v = keys[:, read], values[:, read]
                else:
                    k, v = k_cache.index_select(0, read).transpose(0, 1), v_cache.index_select(0, read).transpose(0, 1)
                # 4-D: torch's CPU flash attention (3-D inputs take its slower math path)
                rows.append(F.scaled_dot_product_attention(q[r : r + 1], k[None], v[None], scale=scale))
            out = rows[0].reshape(1, heads * head_dim) if n == 1 else torch.cat(rows).reshape(n, heads * head_dim)
            h = h + c.o(out.to(c.o_dtype) if c.o_dtype != dtype else out)
            gate_up = c.gate_up(self.norm(h, *c.post_norm, c.gate_up_dtype))
            if gate_up.dtype != dtype:
                gate_up = gate_up.to(dtype)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate)
            if c.down_dtype != dtype:
                act = torch.mul(act, up, out=torch.empty(act.shape, dtype=c.down_dtype))
            else:
                act = act * up
            h = h + c.down(act)
        if not seg.last:
            return h, torch.zeros_like(h)
        out = self.norm(h, fwd.norm.weight, fwd.norm.variance_epsilon, self.head_dtype)
        if self.head_int8:
            head = fwd.model.lm_head
            return torch.ops.aten._weight_int8pack_mm(out, head.q, head.scales).float()
        return fwd.model.lm_head(out[None]).float()[0]
