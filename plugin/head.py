"""A smaller output head on the CPU: the float lm_head quantized at load time (`load_model(head=...)`).

A decode step multiplies the last hidden state by the whole head: 49152 x 576 in SmolLM2-135M, 113 MB of
float32 read per token, as much as all its 4-bit decoder layers together, and more than half of the step's
matmul time on a CPU. Choices:
- "int4": round-to-nearest 4-bit, asymmetric groups of 32 inputs, computed like `cpu-int4` (kernels/cpu_int4.py);
- "int8": round-to-nearest 8-bit, one symmetric scale per output row (torch's `_weight_int8pack_mm`);
- "float": the head as the checkpoint has it;
- "auto": float, except for a model whose head's quality cost was measured: the embedded default model takes
  `DEFAULT_MODEL_HEAD` on the CPU (docs/default-model.md has the measurement).
Only a plain float `nn.Linear` head is touched: a checkpoint that ships a quantized head keeps its own, and a
head tied to the input embeddings stays tied there (the embedding lookup keeps the float weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import GPTQBridgeError
from .kernels.cpu_int4 import BLOCK, COMPUTE, PackedInt4

HEADS = ("auto", "float", "int8", "int4")
DEFAULT_MODEL_HEAD = "int8"  # what "auto" gives the embedded default model on the CPU (measured, see above)


def measured_head(folder: Path) -> str | None:
    """The measured head for a checkpoint default_model.py prepared (its manifest is there), else None."""
    from .default_model import MANIFEST

    return DEFAULT_MODEL_HEAD if (Path(folder) / MANIFEST).is_file() else None


def check_head(head: str) -> str:
    if head not in HEADS:
        raise GPTQBridgeError(f"head: {head!r} is not one of {', '.join(map(repr, HEADS))}")
    return head


class Int4Head(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        out_features, in_features = weight.shape
        w = weight.detach().float().t().reshape(in_features // BLOCK, BLOCK, out_features)  # [blocks, 32, out]
        lo, hi = w.amin(1), w.amax(1)
        scales = ((hi - lo) / 15).clamp(min=1e-10)
        zeros = torch.round(-lo / scales).clamp(0, 15)
        q = torch.clamp(torch.round(w / scales[:, None]) + zeros[:, None], 0, 15).to(torch.int32)
        self.weights = PackedInt4(q.reshape(in_features, out_features), scales, zeros)
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self.weights.matmul(x.reshape(-1, shape[-1]).to(COMPUTE))
        out = out.to(x.dtype).view(*shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 groups of {BLOCK}"


class Int8Head(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        scales = (w.abs().amax(1) / 127).clamp(min=1e-10)
        self.q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.scales = scales.to(COMPUTE)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(COMPUTE)
        out = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.q, self.scales)
        out = out.to(x.dtype).view(*shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per output row"


def compact_head(model: nn.Module, head: str, device: torch.device, measured: str | None = None) -> str:
    """Swap `model.lm_head` for the `head` asked for; returns the head it now has ("float", "int8", "int4").
    `measured`: what "auto" means on the CPU for this model (None: float)."""
    lm_head = getattr(model, "lm_head", None)
    if head == "auto":
        head = (measured or "float") if device.type == "cpu" else "float"
    if head == "float" or type(lm_head) is not nn.Linear or lm_head.weight.is_meta:
        return "float"
    if device.type != "cpu":
        raise GPTQBridgeError(f"head={head!r} runs on the CPU only; on {device} use head='float' or 'auto'")
    out_features, in_features = lm_head.weight.shape
    if head == "int4" and (in_features % BLOCK or out_features % 16):
        return "float"  # the packed op's shapes: inputs in groups of 32, outputs in tiles of 16
    cls = Int4Head if head == "int4" else Int8Head
    model.lm_head = cls(lm_head.weight, lm_head.bias)
    return head
