"""Pure PyTorch kernels: they run anywhere, for every setting.

- `torch` dequantizes on every call: the reference the fast kernels are tested against, and the fallback
  that keeps memory at the checkpoint's size.
- `torch-dense` dequantizes once at load time and then runs a plain dense matmul: the fast CPU path for
  models whose dense weights fit comfortably in memory (the embedded default model, small checkpoints).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import QuantizeConfig
from ..hookspecs import hookimpl
from ..packing import dequantize
from ..types import KernelSpec, LayerShape
from .base import GPTQLinear
from .measured import MEASURED_US


class TorchQuantLinear(GPTQLinear):
    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight, [in, out]."""
        return dequantize(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset, dtype or self.scales.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight(x.dtype)
        return out + self.bias if self.bias is not None else out


class TorchDenseLinear(TorchQuantLinear):
    """Dequantized once in `prepare()`; the packed tensors stay (they are 1/8 of the dense size at 4 bits)."""

    def prepare(self) -> None:
        self.register_buffer("dense", self.weight().t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense.to(x.dtype), self.bias)


def available_memory_bytes() -> int | None:
    """Memory the OS says is available now (Linux), or None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_dense_fits(layers, config: QuantizeConfig, device, dtype: torch.dtype) -> str | None:
    """Dense weights may take at most half of the available memory, so the rest of the system keeps room."""
    need = sum(layer.in_features * layer.out_features for layer in layers) * dtype.itemsize
    free = available_memory_bytes()
    if free is not None and need > free // 2:
        return f"dense weights need {need / 1e9:.1f} GB, more than half of the {free / 1e9:.1f} GB available"
    return None


def _check_layer(layer: LayerShape, config: QuantizeConfig) -> str | None:
    if layer.in_features % 32:
        return "input features must be a multiple of 32 (GPTQ packs 32 rows at a time)"
    return None


TORCH_KERNEL = KernelSpec(
    name="torch",
    description="pure PyTorch dequantize + matmul (reference; any device, every setting)",
    bits=frozenset({2, 3, 4, 8}),
    devices=frozenset({"cpu", "cuda"}),
    measured_us=MEASURED_US["torch"],
    priority=0,
    factory=TorchQuantLinear,
    check_layer=_check_layer,
)

TORCH_DENSE_KERNEL = KernelSpec(
    name="torch-dense",
    description="pure PyTorch, dequantized once at load time (fast CPU path when the dense weights fit)",
    bits=frozenset({2, 3, 4, 8}),
    devices=frozenset({"cpu"}),
    measured_us=MEASURED_US["torch-dense"],
    measured_on="cpu",
    priority=1,
    factory=TorchDenseLinear,
    check_layer=_check_layer,
    check_model=_check_dense_fits,
)


@hookimpl
def gptq_register_kernels(register):
    register(TORCH_KERNEL)
    register(TORCH_DENSE_KERNEL)
