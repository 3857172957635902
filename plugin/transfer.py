"""Host values sent to a device without waiting for the work already queued there.

A copy from ordinary (pageable) host memory to a GPU waits for everything queued on the stream first, so a
decode step built while the previous one runs would stall behind it. Through pinned memory the copy is queued
like a kernel and the host goes on. torch's pinned-memory cache keeps each buffer until its copy has run.
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list or tensor on `device`, queued behind the device's work rather than waiting for it."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def copy_in(buffer: torch.Tensor, values: torch.Tensor) -> None:
    """Fill a device buffer (a CUDA graph's input) from a host tensor, queued the same way."""
    if buffer.device.type == "cuda" and values.device.type == "cpu":
        values = values.pin_memory()
    buffer.copy_(values, non_blocking=True)
