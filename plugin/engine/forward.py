"""The engine's own forward for Llama-family models (Llama, Mistral, Qwen2), reading and writing the paged cache.

It runs the loaded model's own modules (embeddings, norms, quantized or plain Linears, MLP, head) and does
only the attention itself: rotary embedding from a table made once, keys and values written into the
request's cache slots, attention over the slots the request holds. transformers' forward is not used here:
its cache is per call, and it drives shapes from the host at every step.

Two entry points:
- `prefill(seq, start, end)`: one request's prompt tokens [start, end), causal over everything it has cached;
- `decode(batch)`: one new token for each of several requests, each over its own context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from ..fusion import FusedLinear
from ..generation import attention_backends
from . import fused_ops, paged_attention
from .kv_cache import CacheShape, PagedKVCache
from .scheduler import Sequence

FAMILIES = ("llama", "mistral", "qwen2")


def unsupported_reason(hf_model: nn.Module) -> str | None:
    """Why this model cannot run in the engine (None: it can)."""
    config = getattr(hf_model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} is not one of the engine's families ({', '.join(FAMILIES)})"
    base = getattr(hf_model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not hasattr(base, "rotary_emb") or not hasattr(hf_model, "lm_head"):
        return f"{type(hf_model).__name__} does not have the Llama layout (model.layers, rotary_emb, lm_head)"
    attn = layers[0].self_attn
    if any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
        return "query/key norms inside attention are not supported by the engine"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}: the engine's MLP is SiLU-gated"
    if not hasattr(layers[0].input_layernorm, "variance_epsilon"):
        return f"{type(layers[0].input_layernorm).__name__} is not the RMSNorm the engine computes"
    return None


def cache_shape(hf_model: nn.Module, dtype: torch.dtype) -> CacheShape:
    c = hf_model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return CacheShape(
        layers=c.num_hidden_layers,
        kv_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=head_dim,
        dtype=dtype,
    )


def sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return window if isinstance(window, int) and window > 0 else None


def project(module: nn.Module, fused_name: str, names: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The projections of `x`: one GEMM where the loader fused them (fusion.py), else one per projection."""
    fused = getattr(module, fused_name, None)
    if isinstance(fused, FusedLinear):
        return fused(x)
    return tuple(getattr(module, name)(x) for name in names)


class LlamaFamilyForward:
    def __init__(self, hf_model: nn.Module, cache: PagedKVCache, max_positions: int):
        self.model = hf_model
        self.cache = cache
        base = hf_model.model
        self.embed, self.layers, self.norm = base.embed_tokens, base.layers, base.norm
        c = hf_model.config
        self.heads = c.num_attention_heads
        self.kv_heads = cache.shape.kv_heads
        self.head_dim = cache.shape.head_dim
        self.scale = self.head_dim**-0.5
        self.window = sliding_window(c)
        self.device = self.embed.weight.device
        self.dtype = cache.shape.dtype
        with torch.inference_mode():  # the model's own rotary module, once for every position (scaling included)
            positions = torch.arange(max_positions, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = base.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        self.max_positions = max_positions
        self.table_width = -(-max_positions // cache.block_size)  # blocks of the longest possible request
        self.attention = TorchPagedAttention(self)
        self.use_kernel = self.device.type == "cuda" and paged_attention.available()
        self.ops = fused_ops.TritonOps if self.use_kernel else fused_ops.TorchOps

    def clear(self, blocks: list[int]) -> None:
        self.cache.clear(blocks)

    # --- slots -----------------------------------------------------------------------------------------------

    def slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Cache slots of positions [start, end) of a request."""
        pos = torch.arange(start, end)
        blocks = torch.tensor(seq.blocks, dtype=torch.long)[pos // self.cache.block_size]
        return blocks * self.cache.block_size + pos % self.cache.block_size

    # --- the layers --------------------------------------------------------------------------------------------

    def _layers(self, tokens: torch.Tensor, positions: torch.Tensor, write: torch.Tensor, attend) -> torch.Tensor:
        """Hidden states after every layer and the final norm, for N tokens (tokens, positions, slots: [N])."""
        ops, n = self.ops, tokens.shape[0]
        h = self.embed(tokens)
        cos, sin = self.cos[positions], self.sin[positions]
        delta = None
        for i, layer in enumerate(self.layers):
            norm = layer.input_layernorm
            h, x = ops.add_rms_norm(h, delta, norm.weight, norm.variance_epsilon)
            attn = layer.self_attn
            q, k, v = project(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"), x)
            q = ops.rope_store(
                q.view(n, self.heads, self.head_dim),
                k.view(n, self.kv_heads, self.head_dim),
                v.view(n, self.kv_heads, self.head_dim),
                cos,
                sin,
                write,
                self.cache.k[i],
                self.cache.v[i],
            )
            delta = attn.o_proj(attend(i, q).reshape(n, self.heads * self.head_dim))
            norm = layer.post_attention_layernorm
            h, x = ops.add_rms_norm(h, delta, norm.weight, norm.variance_epsilon)
            mlp = layer.mlp
            gate, up = project(mlp, "gate_up_proj", ("gate_proj", "up_proj"), x)
            delta = mlp.down_proj(ops.silu_mul(gate, up))
        return ops.add_rms_norm(h, delta, self.norm.weight, self.norm.variance_epsilon)[1]

    @torch.inference_mode()
    def prefill(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Read prompt tokens [start, end) of one request; the logits after the last of them ([vocab], float32)."""
        return self.prefill_many([(seq, start, end)])[0]

    @torch.inference_mode()
    def prefill_many(self, parts: list[tuple[Sequence, int, int]]) -> torch.Tensor:
        """Read a prompt range [start, end) of each of several requests in one forward: the GEMMs see all their
        tokens as one matrix, attention runs per request. The logits after each part's last token
        ([parts, vocab], float32)."""
        tokens = torch.cat([seq.context[start:end] for seq, start, end in parts]).to(self.device)
        positions = torch.cat([torch.arange(start, end) for _, start, end in parts]).to(self.device)
        write = torch.cat([self.slots(seq, start, end) for seq, start, end in parts]).to(self.device)
        spans, row = [], 0  # per part: its rows in the packed matrix, the slots it attends to, its start
        for seq, start, end in parts:
            spans.append((row, row + end - start, self.slots(seq, 0, end).to(self.device), start))
            row += end - start

        def attend(i, q):
            if len(spans) == 1:
                return self.attention.prefill(i, q, spans[0][2], spans[0][3])
            return torch.cat([self.attention.prefill(i, q[a:b], read, start) for a, b, read, start in spans])

        with attention_backends(self.device):
            h = self._layers(tokens, positions, write, attend)
        last = torch.tensor([b - 1 for _, b, _, _ in spans], device=self.device)
        return self.model.lm_head(h[last][None]).float()[0]  # heads take [batch, seq, hidden], as in transformers

    def first_chunk_on(self, tokens, positions, write, last) -> torch.Tensor:
        """A prompt's first chunk on device tensors (what a prefill graph captures): causal attention over the
        chunk's own keys and values (its slots are `write`); the logits after row `last` ([1, vocab], float32).
        Rows after `last` are padding: causal attention keeps them out of the real rows."""
        with attention_backends(self.device):
            h = self._layers(tokens, positions, write, lambda i, q: self.attention.prefill(i, q, write, 0))
        return self.model.lm_head(h[last][None]).float()[0]

    @torch.inference_mode()
    def decode(self, batch: list[Sequence]) -> torch.Tensor:
        """One token for each request: the logits after it ([batch, vocab], float32)."""
        inputs = decode_inputs(batch, self.cache.block_size)
        return self.decode_on(*(t.to(self.device, non_blocking=True) for t in inputs))

    def decode_on(self, tokens, positions, write, tables, lengths) -> torch.Tensor:
        """The decode step on device tensors (what a CUDA graph captures): shapes only, no host decisions."""
        if self.use_kernel:
            splits = paged_attention.choose_splits(tokens.shape[0], self.kv_heads, tables.shape[1])

            def attend(i, q):
                return paged_attention.paged_decode_attention(
                    q,
                    self.cache.k[i],
                    self.cache.v[i],
                    tables,
                    lengths,
                    self.scale,
                    self.window,
                    splits,
                    self.cache.block_size,
                )
        else:

            def attend(i, q):
                return self.attention.decode(i, q, tables, lengths)

        h = self._layers(tokens, positions, write, attend)
        return self.model.lm_head(h[None]).float()[0]


def decode_inputs(batch: list[Sequence], block_size: int, rows: int | None = None, table_width: int | None = None):
    """Host tensors for one decode step: input tokens, positions, write slots, block tables, context lengths.

    Each request's input is its last token (`Sequence.last`), the one sampled after all it has cached.
    `rows` and `table_width` pad the batch to a fixed shape (CUDA graphs): padded rows write into block 0,
    the padding block, and attend to that one slot.
    """
    rows = rows or len(batch)
    width = table_width or max(len(s.blocks) for s in batch)
    assert len(batch) <= rows and all(len(s.blocks) <= width for s in batch)
    pad = rows - len(batch)
    positions = [s.cached for s in batch]
    write = [s.blocks[p // block_size] * block_size + p % block_size for s, p in zip(batch, positions)]
    tables = [s.blocks + [0] * (width - len(s.blocks)) for s in batch] + [[0] * width] * pad
    return (
        torch.tensor([s.last for s in batch] + [0] * pad, dtype=torch.long),
        torch.tensor(positions + [0] * pad, dtype=torch.long),
        torch.tensor(write + [0] * pad, dtype=torch.long),
        torch.tensor(tables, dtype=torch.int32).reshape(rows, width),
        torch.tensor([p + 1 for p in positions] + [1] * pad, dtype=torch.int32),
    )


class TorchPagedAttention:
    """Attention over paged keys and values with plain torch ops: gather the request's slots, then SDPA.

    Exact and portable (the CPU path, and the reference the GPU kernel is tested against)."""

    def __init__(self, fwd: LlamaFamilyForward):
        self.fwd = fwd

    def _expand(self, kv: torch.Tensor) -> torch.Tensor:
        """[..., kv_heads, L, D] -> [..., heads, L, D] (grouped-query attention)."""
        group = self.fwd.heads // self.fwd.kv_heads
        return kv if group == 1 else kv.repeat_interleave(group, dim=-3)

    def prefill(self, layer: int, q: torch.Tensor, read: torch.Tensor, start: int) -> torch.Tensor:
        """q: [n, heads, D] for positions [start, start + n); read: the slots of positions [0, start + n).

        4-D tensors and a causal mask given as such (no boolean matrix), so flash attention serves it: the
        chunk's queries are aligned to the end of the keys (lower-right), which is plain causal for a first chunk.
        """
        fwd = self.fwd
        k = self._expand(fwd.cache.k[layer][read].transpose(0, 1))[None]  # [1, heads, L, D]
        v = self._expand(fwd.cache.v[layer][read].transpose(0, 1))[None]
        n, total = q.shape[0], read.shape[0]
        q4 = q.transpose(0, 1)[None]  # [1, heads, n, D]
        if fwd.window is None or total <= fwd.window:
            if start == 0:
                out = F.scaled_dot_product_attention(q4, k, v, is_causal=True, scale=fwd.scale)
            else:
                out = F.scaled_dot_product_attention(q4, k, v, attn_mask=causal_lower_right(n, total), scale=fwd.scale)
            return out[0].transpose(0, 1)  # [n, heads, D]
        qpos = torch.arange(start, start + n, device=q.device)[:, None]
        kpos = torch.arange(total, device=q.device)[None]
        allowed = (kpos <= qpos) & (kpos > qpos - fwd.window)
        out = F.scaled_dot_product_attention(q4, k, v, attn_mask=allowed, scale=fwd.scale)
        return out[0].transpose(0, 1)

    def decode(self, layer: int, q: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        fwd = self.fwd
        bs = fwd.cache.block_size
        offsets = torch.arange(bs, device=q.device, dtype=torch.long)
        slots = (tables.long()[:, :, None] * bs + offsets).flatten(1)  # [B, L]
        k = self._expand(fwd.cache.k[layer][slots].transpose(1, 2))  # [B, heads, L, D]
        v = self._expand(fwd.cache.v[layer][slots].transpose(1, 2))
        kpos = torch.arange(slots.shape[1], device=q.device)[None]
        last = lengths.long()[:, None] - 1
        allowed = kpos <= last
        if fwd.window is not None:
            allowed &= kpos > last - fwd.window
        out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=allowed[:, None, None], scale=fwd.scale)
        return out[:, :, 0]  # [B, heads, D]
