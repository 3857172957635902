"""What every quantized Linear module shares: the on-disk tensors as buffers, and a `prepare` step.

The loader creates modules on the meta device, fills the buffers with the checkpoint's tensors (shapes and
dtypes as on disk, floats in the compute dtype), then calls `prepare()` once on the target device. Kernels
that want another layout (rows sorted by group, shuffled bits) build it in `prepare()`, never per call.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from ..config import QuantizeConfig
from ..packing import packed_size
from ..types import LayerShape


class GPTQLinear(nn.Module):
    """Base of quantized Linears: holds qweight, qzeros, scales, g_idx (and bias) exactly as stored."""

    def __init__(self, layer: LayerShape, config: QuantizeConfig, dtype: torch.dtype):
        super().__init__()
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self.bits = config.bits
        self.group_size = config.group_size if config.group_size != -1 else layer.in_features
        self.zero_offset = config.zero_offset
        groups = config.groups(layer.in_features)
        self.register_buffer(
            "qweight", torch.empty(packed_size(self.in_features, self.bits), self.out_features, dtype=torch.int32)
        )
        self.register_buffer(
            "qzeros", torch.empty(groups, packed_size(self.out_features, self.bits), dtype=torch.int32)
        )
        self.register_buffer("scales", torch.empty(groups, self.out_features, dtype=dtype))
        self.register_buffer("g_idx", torch.empty(self.in_features, dtype=torch.int32))
        if layer.bias:
            self.register_buffer("bias", torch.empty(self.out_features, dtype=dtype))
        else:
            self.bias = None
        # where act_order.py sorted the rows by group at load: row j reads feature input_order[j] of the input
        self.register_buffer("input_order", None, persistent=False)

    def default_g_idx(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.in_features, device=device, dtype=torch.int32) // self.group_size

    def fill_missing(self) -> None:
        """Fill what a checkpoint may omit: g_idx, absent from checkpoints made before act-order existed."""
        if self.g_idx.is_meta:
            self.g_idx = self.default_g_idx(self.qweight.device)

    def prepare(self) -> None:
        """Called once after loading, on the target device. Subclasses override it to build their layout."""

    def forward_gathered(self, x: torch.Tensor) -> torch.Tensor:
        """The output for `x` in the input's own feature order (`forward` takes it in the rows' order, which is the
        same unless `input_order` is set). Kernels that gather x anyway override this to gather it once."""
        return self(x if self.input_order is None else x.index_select(-1, self.input_order))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown scratch buffers, kept alive for the CUDA graphs that captured them
_SCRATCH_LOCKS: dict[torch.device, threading.Lock] = {}
_NEW_LOCK = threading.Lock()


def scratch_lock(device: torch.device) -> threading.Lock:
    """The lock of a device's scratch buffers. Models on one GPU share them while each model's generations are
    serialised by its own lock, so every layer call holds this one from taking a buffer until its last launch
    that reads the buffer is queued: one layer's launches then never interleave with another's. The launches
    go to the device's current stream, which runs them in the order they were queued."""
    lock = _SCRATCH_LOCKS.get(device)
    if lock is None:
        with _NEW_LOCK:
            lock = _SCRATCH_LOCKS.setdefault(device, threading.Lock())
    return lock


def scratch(device: torch.device, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A flat scratch tensor of at least `numel` elements, shared by every layer and kernel on a device (split-K
    partial sums, float32; activations gathered into a kernel's order, float16); call it while holding
    `scratch_lock(device)`. It grows to the largest request and stays."""
    buf = _SCRATCH.get((device, dtype))
    if buf is None or buf.numel() < numel:
        if buf is not None:  # a captured CUDA graph may still write to the old one: it must stay allocated
            _RETIRED.append(buf)
        buf = _SCRATCH[(device, dtype)] = torch.empty(max(numel, 1), dtype=dtype, device=device)
    return buf


def split_k_workspace(device: torch.device, numel: int) -> torch.Tensor:
    """float32 scratch for split-K partial sums (see `scratch`; hold `scratch_lock(device)`)."""
    return scratch(device, numel, torch.float32)
