"""Load-time orders that spare the kernels their act-order gathers.

An act-order checkpoint's `down_proj` stores its input rows in input order with scattered groups (`g_idx`), so
every kernel gathers its input into group order before each call: one extra kernel a layer and token on a GPU
(slot_layout.py), an `index_select` on the CPU. That input is the MLP's own activation, silu(gate(x)) * up(x),
and the order of its features is free: permuting the output columns of gate_proj and up_proj and the input rows
of down_proj by one permutation leaves the MLP's output unchanged. The permutation that sorts down_proj's rows by
group makes it a regular layer (g_idx = row // group size), so no kernel gathers anything, and its sums run in the
same order as the sorted layout the kernels would have built.

The other projections read what the engine computes right before them, so on a GPU their rows are sorted by
group too, each keeping the sorting order as its `input_order`, and in a decode step the engine writes their
input in that order in the kernel that computes it (one kernel instead of two): the norm before the fused
q/k/v and gate/up (fusion.py), the paged attention before o_proj (wrapped in `OrderedInput`). Prompts, and any
other caller, go through the module's `forward`, whose kernel reads the input through `input_order` in the
gather it launches anyway (`GPTQLinear.forward_gathered`): a prompt's steps are what they were.

Only layers whose groups are whole (`group_size` rows each, as GPTQ's act-order writes them) are reordered; any
other layout is left as stored. The loader calls `spare_gathers` after the fusion, before `prepare()`, for the
decoder layers on a GPU where the engine is on. (On the CPU a gather is one `index_select` of a row beside a
step of tens of milliseconds: not worth the load-time copies.)
"""

from __future__ import annotations

import torch
from torch import nn

from .fusion import GROUPS, FusedLinear
from .kernels.base import GPTQLinear
from .packing import pack, unpack


def _slice(tensor: torch.Tensor, length: int) -> int:
    """How many rows (or columns) of `length` values to rewrite at a time: the temporaries stay within ~16 MB on
    the CPU, where they come out of the memory that holds the weights, and ~256 MB on a GPU (fewer launches)."""
    budget = 1 << (24 if tensor.is_cuda else 20)
    return max(1, budget // max(1, length))


def group_order(layer: nn.Module) -> torch.Tensor | None:
    """The row order that sorts `layer`'s rows by group (None: regular already, or its groups are not whole)."""
    if not isinstance(layer, GPTQLinear) or layer.g_idx.is_meta or layer.qweight.is_meta:
        return None
    gs, K = layer.group_size, layer.in_features
    if gs % 32 or K % 32:
        return None
    g_idx = layer.g_idx.long()
    regular = torch.arange(K, device=g_idx.device) // gs
    if torch.equal(g_idx, regular):
        return None
    order = torch.argsort(g_idx, stable=True)
    return order if torch.equal(g_idx[order], regular) else None


def permute_rows(module: GPTQLinear, order: torch.Tensor) -> None:
    """Input row j of `module` becomes its old row order[j] (qweight and g_idx)."""
    K, N, bits = module.in_features, module.out_features, module.bits
    words = module.qweight
    order = order.to(words.device)
    step = _slice(words, K)
    for n0 in range(0, N, step):  # each slice of columns only reads itself: rewritten in place
        n1 = min(N, n0 + step)
        if 32 % bits == 0:
            words[:, n0:n1] = permuted_packed_rows(words[:, n0:n1], order, bits)
        else:  # 3 bits: values straddle words
            words[:, n0:n1] = pack(unpack(words[:, n0:n1], bits, 0, K)[order], bits, 0)
    module.g_idx = module.g_idx[order].contiguous()


def permuted_packed_rows(words: torch.Tensor, order: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed rows (2, 4 or 8 bits, each value inside one int32 word) with row j taken from row order[j], built
    one value position of the word at a time: the temporaries are word-sized, not one int64 per value."""
    per, mask = 32 // bits, (1 << bits) - 1
    out = torch.zeros_like(words)
    for p in range(per):  # rows p, p + per, ... sit at bit bits * p of their words
        src = order[p::per]
        shift = (bits * (src % per)).to(torch.int32)[:, None]
        out |= ((words.index_select(0, src // per) >> shift) & mask) << (bits * p)
    return out


def permute_columns(module: nn.Module, columns: torch.Tensor) -> None:
    """Output j of `module` becomes its old output columns[j]; a GPTQ layer or a plain Linear."""
    if isinstance(module, GPTQLinear):
        N, bits = module.out_features, module.bits
        columns = columns.to(module.qweight.device)
        words = module.qweight
        step = _slice(words, N)
        for r0 in range(0, words.shape[0], step):  # each slice of rows only reads itself: rewritten in place
            words[r0 : r0 + step] = words[r0 : r0 + step, columns]
        module.scales = module.scales[:, columns].contiguous()
        module.qzeros = pack(unpack(module.qzeros, bits, 1, N)[:, columns], bits, 1)
        if module.bias is not None:
            module.bias = module.bias[columns].contiguous()
    elif isinstance(module, nn.Linear):
        columns = columns.to(module.weight.device)
        module.weight = nn.Parameter(module.weight.data[columns].contiguous(), requires_grad=False)
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.data[columns].contiguous(), requires_grad=False)
    else:
        raise TypeError(f"cannot reorder the outputs of a {type(module).__name__}")


def _reorderable(module: nn.Module | None) -> bool:
    if isinstance(module, GPTQLinear):
        return not module.qweight.is_meta
    return isinstance(module, nn.Linear) and not module.weight.is_meta


def order_mlp(mlp: nn.Module) -> bool:
    """Reorder one MLP's intermediate features into its down projection's group order; True if it was."""
    down = getattr(mlp, "down_proj", None)
    order = group_order(down)
    if order is None:
        return False
    fused = getattr(mlp, "gate_up_proj", None)
    if isinstance(fused, FusedLinear):
        if len(fused.widths) != 2 or fused.widths[0] != fused.widths[1] or not _reorderable(fused.linear):
            return False
        permute_columns(fused.linear, torch.cat([order, order + fused.widths[0]]))
    else:
        gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
        if not (_reorderable(gate) and _reorderable(up)):
            return False
        permute_columns(gate, order)
        permute_columns(up, order)
    permute_rows(down, order)
    return True


class OrderedInput(nn.Module):
    """o_proj once its rows were sorted by group: `forward` takes x in its own order, as transformers' attention
    gives it (the kernel's gather reads it through the layer's `input_order`); `project` takes x already in the
    rows' order; `scatter` says where each feature goes in that order (the inverse), for the attention kernel."""

    def __init__(self, linear: GPTQLinear):
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("scatter", torch.argsort(linear.input_order).to(torch.int32), persistent=False)

    @property
    def input_order(self) -> torch.Tensor:
        return self.linear.input_order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear.forward_gathered(x)

    def project(self, x_ordered: torch.Tensor) -> torch.Tensor:
        return self.linear(x_ordered)


def sort_rows(layer: nn.Module) -> bool:
    """Sort a layer's rows by group and keep the order as its `input_order`; True if it was."""
    if not isinstance(layer, GPTQLinear) or layer.input_order is not None:
        return False
    order = group_order(layer)
    if order is None:
        return False
    permute_rows(layer, order)
    layer.input_order = order.to(torch.int64)
    return True


def order_output_projection(attn: nn.Module) -> bool:
    """Sort o_proj's rows by group and wrap it in `OrderedInput`; True if it was."""
    layer = getattr(attn, "o_proj", None)
    if not sort_rows(layer):
        return False
    attn.o_proj = OrderedInput(layer)
    return True


def order_fused_input(fused: nn.Module) -> bool:
    """Sort a fused projection's rows by group (`sort_rows`); True if it was."""
    return isinstance(fused, FusedLinear) and sort_rows(fused.linear)


def _blocks(model: nn.Module, blocks: list[int] | None) -> list[nn.Module]:
    layers = list(getattr(getattr(model, "model", None), "layers", []))
    return layers if blocks is None else [layers[i] for i in blocks]


def order_mlps(model: nn.Module, blocks: list[int] | None = None) -> int:
    """`order_mlp` for every decoder layer (or the `blocks` given); returns how many MLPs were reordered."""
    with torch.no_grad():
        return sum(order_mlp(block.mlp) for block in _blocks(model, blocks) if hasattr(block, "mlp"))


def order_inputs(model: nn.Module, blocks: list[int] | None = None) -> int:
    """The fused q/k/v and gate/up (`order_fused_input`) and o_proj (`order_output_projection`) of every decoder
    layer (or the `blocks` given); returns how many were ordered."""
    done = 0
    with torch.no_grad():
        for block in _blocks(model, blocks):
            for part_name, _, fused_name in GROUPS:
                done += order_fused_input(getattr(getattr(block, part_name, None), fused_name, None))
            if hasattr(block, "self_attn"):
                done += order_output_projection(block.self_attn)
    return done


def spare_gathers(model: nn.Module, blocks: list[int] | None = None) -> int:
    """Both orders (`order_mlps`, `order_inputs`) for every decoder layer (or the `blocks` given); returns how
    many layers were reordered."""
    return order_mlps(model, blocks) + order_inputs(model, blocks)
