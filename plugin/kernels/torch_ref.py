"""The reference kernel: dequantize with plain PyTorch, then matmul. Runs anywhere, for every setting.

It is the CPU path, the fallback, and the yardstick the fast kernels are tested against.
"""

from __future__ import annotations

import torch

from ..config import QuantizeConfig
from ..hookspecs import hookimpl
from ..packing import dequantize
from ..types import KernelSpec, LayerShape
from .base import GPTQLinear


class TorchQuantLinear(GPTQLinear):
    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight, [in, out]."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset,
                          dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight(x.dtype)
        return out + self.bias if self.bias is not None else out


def _check_layer(layer: LayerShape, config: QuantizeConfig) -> str | None:
    if layer.in_features % 32:
        return "input features must be a multiple of 32 (GPTQ packs 32 rows at a time)"
    return None


def make_torch_linear(layer: LayerShape, config: QuantizeConfig, dtype: torch.dtype) -> TorchQuantLinear:
    return TorchQuantLinear(layer, config, dtype)


TORCH_KERNEL = KernelSpec(
    name="torch",
    description="pure PyTorch dequantize + matmul (reference; any device, every setting)",
    bits=frozenset({2, 3, 4, 8}),
    devices=frozenset({"cpu", "cuda"}),
    priority=0,
    factory=make_torch_linear,
    check_layer=_check_layer,
)


@hookimpl
def gptq_register_kernels(register):
    register(TORCH_KERNEL)
