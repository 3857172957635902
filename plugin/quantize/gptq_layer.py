"""One quantized layer as integers, and its on-disk GPTQ tensors.

The quantizer (and round-to-nearest, used for tests and baselines) produce integer weights `q` [in, out],
integer zero points [G, out], scales [G, out] and `g_idx` [in]; `pack_layer` turns them into the tensors
AutoGPTQ writes, including v1's "store z - 1" convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..packing import pack


@dataclass
class IntLayer:
    """A quantized layer before packing. w[i, o] = (q[i, o] - zeros[g_idx[i], o]) * scales[g_idx[i], o]."""

    q: torch.Tensor  # [in, out], integers in [0, 2**bits)
    zeros: torch.Tensor  # [G, out], integers in [0, 2**bits)
    scales: torch.Tensor  # [G, out], float
    g_idx: torch.Tensor  # [in], int

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [in, out] these integers stand for (scales rounded to float16 as stored)."""
        g = self.g_idx.long()
        s = self.scales.to(torch.float16).to(torch.float32)
        return (self.q.to(torch.float32) - self.zeros[g].to(torch.float32)) * s[g]


def pack_layer(layer: IntLayer, bits: int, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The four tensors of a GPTQ Linear, as AutoGPTQ (v1) or GPTQModel v2 writes them."""
    zeros = layer.zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        if int(zeros.min()) < 1:
            raise ValueError("v1 ('gptq') checkpoints cannot store a zero point of 0; use gptq_v2")
        zeros = zeros - 1
    return {
        "qweight": pack(layer.q, bits, 0),
        "qzeros": pack(zeros, bits, 1),
        "scales": layer.scales.to(torch.float16).contiguous(),
        "g_idx": layer.g_idx.to(torch.int32).contiguous(),
    }


def group_index(in_features: int, group_size: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """g_idx: rows are grouped in `order` (act-order walks rows by importance), `group_size` rows a group."""
    g = group_size if group_size != -1 else in_features
    g_idx = torch.empty(in_features, dtype=torch.int32)
    order = torch.arange(in_features) if order is None else order
    g_idx[order] = (torch.arange(in_features) // g).to(torch.int32)
    return g_idx


def rtn_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = True,
    order: torch.Tensor | None = None,
    min_zero: int = 0,
) -> IntLayer:
    """Round-to-nearest quantization of an nn.Linear weight [out, in] (the baseline GPTQ must beat).

    `order` gives act-order's row order (groups are formed along it); `min_zero` = 1 keeps asymmetric
    zero points storable in v1 checkpoints.
    """
    w = weight.detach().to(torch.float32).t()  # [in, out]
    in_features = w.shape[0]
    g_idx = group_index(in_features, group_size, order)
    groups = int(g_idx.max()) + 1
    maxq = 2**bits - 1
    scales = torch.empty(groups, w.shape[1])
    zeros = torch.empty(groups, w.shape[1], dtype=torch.int64)
    for g in range(groups):
        rows = w[g_idx == g]
        lo = torch.clamp(rows.min(0).values, max=0)
        hi = torch.clamp(rows.max(0).values, min=0)
        if sym:
            hi = torch.maximum(hi.abs(), lo.abs())
            scale = 2 * hi / maxq
            zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
        else:
            scale = (hi - lo) / maxq
            zero = torch.round(-lo / torch.where(scale == 0, 1.0, scale)).to(torch.int64)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        scales[g] = scale.to(torch.float16).to(torch.float32)
        zeros[g] = torch.clamp(zero, min_zero, maxq)
    g = g_idx.long()
    q = torch.clamp(torch.round(w / scales[g]) + zeros[g], 0, maxq).to(torch.int64)
    return IntLayer(q=q, zeros=zeros, scales=scales, g_idx=g_idx)
