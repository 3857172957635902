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

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..act_order import OrderedInput
from ..fusion import FusedLinear
from ..generation import attention_backends
from ..transfer import to_device
from . import fused_ops, paged_attention
from .cpu_step import CpuDecode
from .kv_cache import CacheShape, PagedKVCache
from .scheduler import Sequence

FAMILIES = ("llama", "mistral", "qwen2")
QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


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


def on(device: torch.device):
    """The device's context: kernels (Triton, the mma library) launch on the current device, so a segment on
    another GPU runs with that GPU current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def norm_project(ops, h, delta, norm, module: nn.Module, fused_name: str, names: tuple[str, ...], ordered: bool):
    """(h + delta, the projections of its norm): one GEMM where the loader fused them (fusion.py), else one per
    projection. `ordered`: a fused layer whose rows are in group order (act_order.py) gets the norm written in
    its order (else its kernel reads the norm through that order)."""
    fused = getattr(module, fused_name, None)
    order = fused.input_order if ordered and isinstance(fused, FusedLinear) else None
    h, x = ops.add_rms_norm(h, delta, norm.weight, norm.variance_epsilon, order)
    if isinstance(fused, FusedLinear):
        return h, fused.project(x) if order is not None else fused(x)
    return h, tuple(getattr(module, name)(x) for name in names)


@dataclass
class Segment:
    """Consecutive decoder layers on one device (one slot of a split; the whole model when it is not split)."""

    device: torch.device
    start: int  # decoder layers [start, end)
    end: int
    first: bool  # holds the embeddings: its input is token ids, else the previous segment's (h, delta)
    last: bool  # holds the final norm and the head
    ops: type
    use_kernel: bool  # the paged attention kernel (CUDA), else torch ops
    cos: torch.Tensor
    sin: torch.Tensor


class LlamaFamilyForward:
    """`placement` (placement.py) splits the layers into segments, one per device slot: hidden states (h and the
    residual delta not yet added) move between them at the split points; each segment's layers keep their KV
    cache on their own device."""

    def __init__(self, hf_model: nn.Module, cache: PagedKVCache, max_positions: int, placement=None):
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
        if placement is None:
            spans = [(self.device, 0, len(self.layers), True, True)]
        else:
            spans = [(torch.device(s.device), *s.layers, s.embed, s.head) for s in placement.slots]
        self.segments = [self._segment_on(*span) for span in spans]
        self._cpu_steps: dict[int, CpuDecode] = {}  # per CPU segment, its decode step (cpu_step.py), made at first use
        self.use_kernel, self.ops = self.segments[0].use_kernel, self.segments[0].ops

    def _segment_on(self, device: torch.device, start: int, end: int, first: bool, last: bool) -> Segment:
        use_kernel = device.type == "cuda" and paged_attention.available()
        return Segment(
            device=device,
            start=start,
            end=end,
            first=first,
            last=last,
            ops=fused_ops.TritonOps if use_kernel else fused_ops.TorchOps,
            use_kernel=use_kernel,
            cos=self.cos.to(device),
            sin=self.sin.to(device),
        )

    @property
    def split(self) -> bool:
        return len(self.segments) > 1

    def clear(self, blocks: list[int]) -> None:
        self.cache.clear(blocks)

    # --- slots -----------------------------------------------------------------------------------------------

    def slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Cache slots of positions [start, end) of a request."""
        pos = torch.arange(start, end)
        blocks = torch.tensor(seq.blocks, dtype=torch.long)[pos // self.cache.block_size]
        return blocks * self.cache.block_size + pos % self.cache.block_size

    # --- the layers --------------------------------------------------------------------------------------------

    def run_segment(self, seg: Segment, x: torch.Tensor, delta, positions, write, attend, ordered: bool = False):
        """One segment's layers for N tokens. `x` is token ids [N] on the first segment, else the hidden states
        [N, hidden] with `delta`, the last layer's output not yet added. `attend(layer, q, into)` gives the
        attention output [N, heads * D], in the input order of `into` (an o_proj whose rows are sorted by group)
        when that is not None (`placed`). `ordered` (decode steps): the norms and the attention write the inputs
        of layers whose rows are sorted by group (act_order.py) in their order. Returns (h, delta), or on the last
        segment the hidden states after the final norm."""
        ops = seg.ops
        h = self.embed(x) if seg.first else x
        n = h.shape[0]
        cos, sin = seg.cos[positions], seg.sin[positions]
        for i in range(seg.start, seg.end):
            layer = self.layers[i]
            attn = layer.self_attn
            h, (q, k, v) = norm_project(ops, h, delta, layer.input_layernorm, attn, "qkv_proj", QKV, ordered)
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
            o_proj = attn.o_proj
            into = o_proj if ordered and isinstance(o_proj, OrderedInput) else None  # rows sorted by group
            out = attend(i, q, into)  # [n, heads * D], in o_proj's input order
            delta = o_proj(out) if into is None else into.project(out)
            mlp = layer.mlp
            norm = layer.post_attention_layernorm
            h, (gate, up) = norm_project(ops, h, delta, norm, mlp, "gate_up_proj", GATE_UP, ordered)
            delta = mlp.down_proj(ops.silu_mul(gate, up))
        if seg.last:
            return ops.add_rms_norm(h, delta, self.norm.weight, self.norm.variance_epsilon)[1]
        return h, delta if delta is not None else torch.zeros_like(h)  # h + 0 is h: the next segment adds it

    def _layers(self, tokens: torch.Tensor, positions: torch.Tensor, write: torch.Tensor, attend) -> torch.Tensor:
        """Hidden states after every layer and the final norm, for N tokens of an unsplit model."""
        assert not self.split
        return self.run_segment(self.segments[0], tokens, None, positions, write, attend)

    @torch.inference_mode()
    def prefill(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Read prompt tokens [start, end) of one request; the logits after the last of them ([vocab], float32)."""
        return self.prefill_many([(seq, start, end)])[0]

    @torch.inference_mode()
    def prefill_many(self, parts: list[tuple[Sequence, int, int]]) -> torch.Tensor:
        """Read a prompt range [start, end) of each of several requests in one forward: the GEMMs see all their
        tokens as one matrix, attention runs per request. The logits after each part's last token
        ([parts, vocab], float32)."""
        tokens = torch.cat([seq.context[start:end] for seq, start, end in parts])
        positions = torch.cat([torch.arange(start, end) for _, start, end in parts])
        write = torch.cat([self.slots(seq, start, end) for seq, start, end in parts])
        spans, row = [], 0  # per part: its rows in the packed matrix, the slots it attends to, its start
        for seq, start, end in parts:
            spans.append((row, row + end - start, self.slots(seq, 0, end), start))
            row += end - start
        x, delta = tokens, None
        for seg in self.segments:  # one segment unless the model is split across devices
            dev = seg.device
            here = [(a, b, read.to(dev), start) for a, b, read, start in spans]

            def attend(i, q, into, here=here):
                if len(here) == 1:
                    return placed(self.attention.prefill(i, q, here[0][2], here[0][3]), into)
                parts = [self.attention.prefill(i, q[a:b], read, start) for a, b, read, start in here]
                return placed(torch.cat(parts), into)

            x, delta = x.to(dev), None if delta is None else delta.to(dev)
            with on(dev), attention_backends(dev):
                out = self.run_segment(seg, x, delta, positions.to(dev), write.to(dev), attend)
            if seg.last:
                last = torch.tensor([b - 1 for _, b, _, _ in spans], device=dev)
                return self.model.lm_head(out[last][None]).float()[0]  # heads take [batch, seq, hidden]
            x, delta = out
        raise AssertionError("no segment holds the head")

    def first_chunk_on(self, tokens, positions, write, last) -> torch.Tensor:
        """A prompt's first chunk on device tensors (what a prefill graph captures): causal attention over the
        chunk's own keys and values (its slots are `write`); the logits after row `last` ([1, vocab], float32).
        Rows after `last` are padding: causal attention keeps them out of the real rows."""
        with attention_backends(self.device):
            h = self._layers(
                tokens, positions, write, lambda i, q, into: placed(self.attention.prefill(i, q, write, 0), into)
            )
        return self.model.lm_head(h[last][None]).float()[0]

    @torch.inference_mode()
    def decode(self, batch: list[Sequence], feed: Feed | None = None) -> torch.Tensor:
        """One token for each request: the logits after it ([batch, vocab], float32). `feed`: rows whose input
        token is still on the device."""
        tokens, *rest = decode_inputs(batch, self.cache.block_size)
        x, delta = tokens, None
        for seg in self.segments:
            dev = seg.device
            inputs = [to_device(t, t.dtype, dev) for t in rest]
            if seg.first:
                x = to_device(x, x.dtype, dev)
                if feed is not None:
                    feed.apply(x)
            with on(dev):
                out = self.decode_segment(seg, x.to(dev), None if delta is None else delta.to(dev), *inputs)
            if seg.last:
                return out
            x, delta = out
        raise AssertionError("no segment holds the head")

    def decode_on(self, tokens, positions, write, tables, lengths) -> torch.Tensor:
        """The decode step of an unsplit model on device tensors (what a CUDA graph captures)."""
        return self.decode_segment(self.segments[0], tokens, None, positions, write, tables, lengths)

    def decode_segment(self, seg: Segment, x, delta, positions, write, tables, lengths):
        """One segment of a decode step on its device's tensors: shapes only, no host decisions (a CUDA graph
        captures it). Returns (h, delta), or the logits ([batch, vocab], float32) on the last segment.
        A CPU segment runs `cpu_step.CpuDecode`: the same layers in fewer ops, reading the block table on the host."""
        if seg.device.type == "cpu":
            step = self._cpu_steps.get(id(seg))
            if step is None:
                step = self._cpu_steps[id(seg)] = CpuDecode(self, seg)
            return step(x, delta, positions, write, tables, lengths)
        if seg.use_kernel:
            splits = paged_attention.choose_splits(x.shape[0], self.kv_heads, tables.shape[1])

            def attend(i, q, into):
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
                    None if into is None else into.scatter,
                ).view(q.shape[0], -1)
        else:
            plan = self.attention.decode_plan(tables, lengths)  # once a step, shared by every layer

            def attend(i, q, into):
                return placed(self.attention.decode(i, q, plan), into)

        out = self.run_segment(seg, x, delta, positions, write, attend, ordered=True)
        return self.model.lm_head(out[None]).float()[0] if seg.last else out


def placed(out: torch.Tensor, into: OrderedInput | None) -> torch.Tensor:
    """An attention output [n, heads, D] as o_proj's input [n, heads * D], in its input order when it has one."""
    flat = out.reshape(out.shape[0], -1)
    return flat if into is None else flat.index_select(-1, into.input_order)


@dataclass
class Feed:
    """Rows of a decode step whose input token is still on the device: sampled by the step before, whose
    tokens the host has not read yet. Their rows of the host-built token input are overwritten on the device."""

    rows: list[int]  # rows of this step
    source_rows: list[int]  # the same requests' rows in `tokens`
    tokens: torch.Tensor  # the previous step's token ids, on the device

    def apply(self, inputs: torch.Tensor) -> None:
        n = len(self.rows)
        tokens = self.tokens.to(inputs.device, non_blocking=True)
        if self.rows == self.source_rows == list(range(n)):  # the same requests in the same order: one copy
            inputs[:n].copy_(tokens[:n])
            return
        rows = to_device(self.rows, torch.long, inputs.device)
        inputs.index_copy_(0, rows, tokens.index_select(0, to_device(self.source_rows, torch.long, inputs.device)))


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
    tables = torch.stack([s.table_row(width) for s in batch] + [torch.zeros(width, dtype=torch.int32)] * pad)
    return (
        torch.tensor([s.last for s in batch] + [0] * pad, dtype=torch.long),
        torch.tensor(positions + [0] * pad, dtype=torch.long),
        torch.tensor(write + [0] * pad, dtype=torch.long),
        tables,
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
                from torch.nn.attention.bias import causal_lower_right  # here: importing it costs ~1.5 s (dynamo)

                mask = causal_lower_right(n, total)
                out = F.scaled_dot_product_attention(q4, k, v, attn_mask=mask, scale=fwd.scale)
            return out[0].transpose(0, 1)  # [n, heads, D]
        qpos = torch.arange(start, start + n, device=q.device)[:, None]
        kpos = torch.arange(total, device=q.device)[None]
        allowed = (kpos <= qpos) & (kpos > qpos - fwd.window)
        out = F.scaled_dot_product_attention(q4, k, v, attn_mask=allowed, scale=fwd.scale)
        return out[0].transpose(0, 1)

    def decode_plan(self, tables: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cache slots each row reads ([B, L]) and which it may see ([B, 1, 1, L], None: all of them).

        Host tensors (the CPU) are read here: only the blocks in use are gathered, and a single row reads exactly
        its context, with no mask. Device tensors keep the whole table (a CUDA graph replays fixed shapes)."""
        fwd = self.fwd
        bs = fwd.cache.block_size
        on_host = tables.device.type == "cpu"
        if on_host:
            tables = tables[:, : -(-int(lengths.max()) // bs)]
        offsets = torch.arange(bs, device=tables.device, dtype=torch.long)
        slots = (tables.long()[:, :, None] * bs + offsets).flatten(1)  # [B, L]
        if on_host and slots.shape[0] == 1 and fwd.window is None:
            return slots[:, : int(lengths[0])], None
        kpos = torch.arange(slots.shape[1], device=slots.device)[None]
        last = lengths.long()[:, None] - 1
        allowed = kpos <= last
        if fwd.window is not None:
            allowed &= kpos > last - fwd.window
        return slots, allowed[:, None, None]

    def decode(self, layer: int, q: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """q [B, heads, D] over the slots of `decode_plan`; grouped-query heads read their KV head in place."""
        fwd = self.fwd
        slots, allowed = plan
        b, length = slots.shape
        flat = slots.reshape(-1)
        k = fwd.cache.k[layer].index_select(0, flat).view(b, length, fwd.kv_heads, fwd.head_dim).transpose(1, 2)
        v = fwd.cache.v[layer].index_select(0, flat).view(b, length, fwd.kv_heads, fwd.head_dim).transpose(1, 2)
        qg = q.reshape(b, fwd.kv_heads, fwd.heads // fwd.kv_heads, fwd.head_dim)  # [B, kv_heads, group, D]
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * fwd.scale  # [B, kv_heads, group, L]
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # [B, kv_heads, group, D]
        return out.reshape(b, fwd.heads, fwd.head_dim)
