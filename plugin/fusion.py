"""Fused projections, made once at load time: q/k/v as one quantized GEMM, gate/up as one.

Three small GEMMs that read the same input cost more than one wide one: each launch pays its own latency, each
act-order checkpoint gathers the input into its own order, and a narrow matrix (1024 columns of k and v in a
70B model) leaves most of the GPU idle. Layers that read the same input with the same group order (g_idx),
bits and group size are concatenated along their outputs before the kernel prepares its layout; the old
names stay as slices, so transformers' forward and any code that calls `q_proj` keep working, and the
engine calls the fused layer once. On a GPU an act-order fused layer's rows may also be sorted by group
(act_order.py): it then reads its input in `input_order`, which `forward` gathers and the engine's norm writes.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from .config import QuantizeConfig
from .kernels.base import GPTQLinear
from .types import KernelSpec, LayerShape

GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"), ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"))


class FusedLinear(nn.Module):
    """One quantized GEMM for several projections; `forward` returns their outputs as a tuple."""

    def __init__(self, linear: GPTQLinear, widths: list[int]):
        super().__init__()
        self.linear = linear
        self.widths = widths
        self._last = threading.local()

    @property
    def input_order(self) -> torch.Tensor | None:
        """Row j of the layer reads feature input_order[j] of x (act_order.py); None: the same order."""
        return self.linear.input_order

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear.forward_gathered(x).split(self.widths, dim=-1)

    def project(self, x_ordered: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs for an input already in `input_order` (the engine's norm writes it so)."""
        return self.linear(x_ordered).split(self.widths, dim=-1)

    def outputs_for(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs for `x`, computed once when several slices ask for the same input one after another."""
        version = None if x.is_inference() else x._version  # inference tensors cannot change in place
        last = getattr(self._last, "value", None)
        if last is None or last[0] is not x or last[1] != version:
            last = self._last.value = (x, version, self(x))
        return last[2]


class ProjectionSlice(nn.Module):
    """What `q_proj` (or `k_proj`, ...) became: its share of a `FusedLinear`."""

    def __init__(self, fused: FusedLinear, index: int, in_features: int, out_features: int):
        super().__init__()
        self.fused = [fused]  # a list: not registered as a submodule again under this name
        self.index = index
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused[0].outputs_for(x)[self.index]

    def extra_repr(self) -> str:
        return f"output {self.index} of the fused projection"


def fusable(layers: list[nn.Module]) -> bool:
    first = layers[0]
    return (
        all(type(m) is type(first) and isinstance(m, GPTQLinear) for m in layers)
        and all(
            m.in_features == first.in_features
            and m.bits == first.bits
            and m.group_size == first.group_size
            and (m.bias is None) == (first.bias is None)
            and m.out_features % 32 == 0
            for m in layers
        )
        and all(torch.equal(m.g_idx, first.g_idx) for m in layers[1:])
    )


def fuse_projections(
    model: nn.Module, kernel: KernelSpec, config: QuantizeConfig, dtype: torch.dtype, blocks: list[int] | None = None
) -> int:
    """Fuse q/k/v and gate/up of every decoder layer (or of the `blocks` given) whose tensors allow it (before
    `prepare()`); returns how many fused layers were made."""
    made = 0
    layers = list(getattr(getattr(model, "model", None), "layers", []))
    for block in layers if blocks is None else [layers[i] for i in blocks]:
        for part_name, names, fused_name in GROUPS:
            part = getattr(block, part_name, None)
            layers = [getattr(part, n, None) for n in names]
            if part is None or any(m is None for m in layers) or not fusable(layers):
                continue
            first = layers[0]
            widths = [m.out_features for m in layers]
            shape = LayerShape(
                name=fused_name, in_features=first.in_features, out_features=sum(widths), bias=first.bias is not None
            )
            if kernel.check_layer(shape, config) is not None:
                continue
            with torch.device("meta"):
                linear = kernel.factory(shape, config, dtype)
            linear.qweight = torch.cat([m.qweight for m in layers], dim=1)
            linear.qzeros = torch.cat([m.qzeros for m in layers], dim=1)
            linear.scales = torch.cat([m.scales for m in layers], dim=1)
            linear.g_idx = first.g_idx
            if first.bias is not None:
                linear.bias = torch.cat([m.bias for m in layers])
            fused = FusedLinear(linear, widths)
            setattr(part, fused_name, fused)
            for i, (name, m) in enumerate(zip(names, layers)):
                setattr(part, name, ProjectionSlice(fused, i, m.in_features, m.out_features))
            made += 1
    return made
