"""Bit packing against an independent bit-by-bit implementation of the format doc's rules."""

import pytest
import torch

from gptq_bridge.packing import dequantize, pack, packed_size, unpack


def naive_pack_column(values: list[int], bits: int) -> list[int]:
    """Straight from the format doc: 32 values form one little-endian stream over `bits` words."""
    words = []
    for block in range(0, len(values), 32):
        stream = 0
        for k, v in enumerate(values[block : block + 32]):
            stream |= v << (bits * k)
        for w in range(bits):
            word = (stream >> (32 * w)) & 0xFFFFFFFF
            words.append(word - 2**32 if word >= 2**31 else word)
    return words


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_bit_stream_definition(bits):
    torch.manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 5))
    packed = pack(values, bits, dim=0)
    assert packed.dtype == torch.int32 and packed.shape == (2 * bits, 5)
    for col in range(5):
        assert packed[:, col].tolist() == naive_pack_column(values[:, col].tolist(), bits)


def test_three_bit_straddling_values_sit_where_the_doc_says():
    values = torch.zeros(32, 1, dtype=torch.int64)
    values[10] = 0b111  # low 2 bits at bits 30-31 of word 0, top bit at bit 0 of word 1
    values[21] = 0b110  # low bit at bit 31 of word 1 (0 here), top 2 bits at bits 0-1 of word 2
    words = [w & 0xFFFFFFFF for w in pack(values, 3, 0)[:, 0].tolist()]
    assert words == [0b11 << 30, 0b1, 0b11]
    assert unpack(pack(values, 3, 0), 3, 0)[:, 0].tolist() == values[:, 0].tolist()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip_with_padding(bits, dim):
    torch.manual_seed(0)
    shape = (70, 40) if dim == 0 else (40, 70)  # 70 is not a multiple of 32: padded with zero values
    values = torch.randint(0, 2**bits, shape)
    packed = pack(values, bits, dim)
    assert packed.shape[dim] == packed_size(70, bits)
    assert torch.equal(unpack(packed, bits, dim, 70), values.int())


def test_symmetric_four_bit_v1_zeros_read_0x77777777():
    zeros_minus_one = torch.full((1, 8), 7)
    assert pack(zeros_minus_one, 4, 1)[0, 0].item() == 0x77777777


def test_pack_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([[16]]), 4, 0)


def test_dequantize_uses_g_idx_and_zero_offset():
    q = torch.tensor([[3, 1], [0, 2]] * 16)  # [32, 2]
    zeros = torch.tensor([[1, 2], [0, 3]])  # stored values, 2 groups
    scales = torch.tensor([[0.5, 1.0], [2.0, 0.25]], dtype=torch.float16)
    g_idx = torch.tensor([0, 1] * 16, dtype=torch.int32)
    w = dequantize(pack(q, 2, 0), pack(zeros, 2, 1), scales, g_idx, bits=2, zero_offset=1)
    # row 0 uses group 0 with z = stored + 1 = (2, 3); row 1 uses group 1 with z = (1, 4)
    assert w[0].tolist() == [(3 - 2) * 0.5, (1 - 3) * 1.0]
    assert w[1].tolist() == [(0 - 1) * 2.0, (2 - 4) * 0.25]
