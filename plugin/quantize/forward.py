"""Running a decoder block, or part of one, on stored calibration states."""

from __future__ import annotations

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (we already have what we came for)."""


def first_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def call_block(block: nn.Module, state: torch.Tensor, kwargs: dict):
    """The block on one batch of stored states. States are kept in the model's own dtype between blocks
    (half the memory of float32 for a float16 model); the block computes in its parameters' dtype."""
    return block(state.to(next(block.parameters()).dtype), **kwargs)


def run_block(block, states, kwargs_list) -> list[torch.Tensor]:
    """The block's outputs on every batch, stored in the dtype of its inputs."""
    return [first_output(call_block(block, h, kw)).to(h.dtype) for h, kw in zip(states, kwargs_list)]
