"""Rows sorted by group: the layout the project's GPU kernels read (built once, in a module's `prepare()`).

An act-order checkpoint stores its rows in input order with a group index per row (`g_idx`), so consecutive
rows belong to scattered groups. Sorting the rows by group makes every run of `P` consecutive "slots" one
group: a kernel then loads one scale per group and column instead of gathering one per row, and reads the
activations through `perm` (slot -> input row) instead.
- Regular checkpoints (g_idx == i // g, g a multiple of 32) keep the on-disk words untouched: no copy, no perm.
- Act-order with whole groups: sorted position = slot.
- Irregular groups (uneven row counts, or a size that is not a multiple of 32) are padded to `P` slots each;
  pad slots point to no input row (perm = -1) and hold q = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..packing import pack, unpack
from .base import GPTQLinear


@dataclass
class SlotLayout:
    qweight: torch.Tensor  # packed like the checkpoint's qweight, but rows in slot order: [slots * bits / 32, N]
    perm: torch.Tensor | None  # int32 [slots]: slot -> input row, -1 for a pad slot; None: slot == row
    slots: int  # KS, a multiple of 32
    slots_per_group: int  # P, a multiple of 32 (the group size itself when rows are regular)


def sort_rows_by_group(module: GPTQLinear) -> SlotLayout:
    """The module's qweight with rows in slot order (see the module docstring)."""
    dev = module.qweight.device
    K, N, bits = module.in_features, module.out_features, module.bits
    G = module.scales.shape[0]
    g_idx = (module.g_idx if not module.g_idx.is_meta else module.default_g_idx(dev)).to(dev).long()
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
        raise ValueError(f"g_idx holds groups outside 0..{G - 1}")
    gs = module.group_size
    ar = torch.arange(K, device=dev)
    if gs % 32 == 0 and torch.equal(g_idx, ar // gs):
        return SlotLayout(module.qweight, None, K, gs)  # the on-disk words as they are
    order = torch.argsort(g_idx, stable=True)
    counts = torch.bincount(g_idx, minlength=G)
    regular = gs % 32 == 0 and bool((counts[:-1] == gs).all()) and int(counts[-1]) <= gs
    if regular:  # act-order with whole groups: sorted position = slot
        P, KS = gs, K
        slots = ar
    else:  # irregular groups: pad each group to P slots
        P = max(32, -(-int(counts.max()) // 32) * 32)
        KS = G * P
        starts = torch.cumsum(counts, 0) - counts
        sorted_g = g_idx[order]
        slots = sorted_g * P + (ar - starts[sorted_g])
    q = unpack(module.qweight, bits, 0, K)
    qs = torch.zeros(KS, N, dtype=torch.int32, device=dev)
    qs[slots] = q[order]
    del q
    qw = pack(qs, bits, 0)
    del qs
    perm = torch.full((KS,), -1, dtype=torch.int32, device=dev)
    perm[slots] = order.to(torch.int32)
    return SlotLayout(qw, perm, KS, P)


def zero_points(module: GPTQLinear) -> torch.Tensor:
    """The zero point of every (group, column) as int32 [G, N], v1's +1 applied."""
    return unpack(module.qzeros, module.bits, 1, module.out_features) + module.zero_offset
