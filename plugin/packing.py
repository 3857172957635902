"""AutoGPTQ's bit packing, for any of 2, 3, 4 and 8 bits.

Every 32 consecutive values along the packed dimension form one little-endian bit stream over `bits` int32
words: value k starts at bit `bits * k`. For 2/4/8 bits each value lies inside one word; for 3 bits, values 10
and 21 of each block straddle two words. `qweight` is packed along its rows (input features), `qzeros` along
its columns (output features). A dimension that is not a multiple of 32 is padded with zero values.
"""

from __future__ import annotations

import torch

_U32 = 0xFFFFFFFF


def packed_size(n: int, bits: int) -> int:
    """Number of int32 words that hold n values of `bits` bits (whole 32-value blocks)."""
    return -(-n // 32) * bits


def _layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(32, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32  # word index and bit offset of each value in its block


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer values in [0, 2**bits) along `dim` (0 = rows as in qweight, 1 = columns as in qzeros)."""
    if values.ndim != 2 or dim not in (0, 1):
        raise ValueError("pack expects a 2-D tensor and dim 0 or 1")
    v = values.to(torch.int64)
    if int(v.min()) < 0 or int(v.max()) >= 2**bits:
        raise ValueError(f"values out of range for {bits}-bit packing")
    if dim == 1:
        return pack(v.t(), bits, 0).t().contiguous()
    n, cols = v.shape
    blocks = -(-n // 32)
    if blocks * 32 != n:
        v = torch.cat([v, v.new_zeros(blocks * 32 - n, cols)])
    v = v.view(blocks, 32, cols)
    word, offset = _layout(bits, v.device)
    out = torch.zeros(blocks, bits, cols, dtype=torch.int64, device=v.device)
    for k in range(32):
        w, o = int(word[k]), int(offset[k])
        out[:, w] |= (v[:, k] << o) & _U32
        if o + bits > 32:  # the value straddles into the next word
            out[:, w + 1] |= v[:, k] >> (32 - o)
    return _to_int32(out.view(blocks * bits, cols))


def unpack(packed: torch.Tensor, bits: int, dim: int, n: int | None = None) -> torch.Tensor:
    """Inverse of `pack`: int32 words to values (int32), trimmed to n along `dim` when given."""
    if dim == 1:
        return unpack(packed.t(), bits, 0, n).t()
    words, cols = packed.shape
    if words % bits:
        raise ValueError(f"{words} packed rows is not a multiple of {bits} ({bits}-bit blocks use {bits} words)")
    if 32 % bits == 0:  # 2, 4, 8 bits: each value sits inside one word
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32).view(1, per, 1)
        values = (packed.view(words, 1, cols) >> shifts) & (2**bits - 1)
        values = values.reshape(words * per, cols)
    else:
        blocks = words // bits
        w = (packed.to(torch.int64) & _U32).view(blocks, bits, cols)
        word, offset = _layout(bits, packed.device)
        lo = w[:, word]
        hi = w[:, torch.clamp(word + 1, max=bits - 1)]
        stream = lo | (hi << 32)
        values = ((stream >> offset.view(1, 32, 1)) & (2**bits - 1)).to(torch.int32)
        values = values.reshape(blocks * 32, cols)
    return values if n is None else values[:n]


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The float weight [in, out] a GPTQ layer stands for: (q - z[g_idx]) * s[g_idx]."""
    in_features, out_features = g_idx.shape[0], scales.shape[1]
    q = unpack(qweight, bits, 0, in_features)
    z = unpack(qzeros, bits, 1, out_features) + zero_offset
    g = g_idx.long()
    return (q - z[g]).to(dtype) * scales.to(dtype)[g]
