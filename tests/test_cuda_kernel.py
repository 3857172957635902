"""The CUDA kernel's parts that a CPU can check: the q4mma weight layout, the mma fragment contract it is
built on, the build, registration and the shared scratch. The kernel itself runs in tests/gpu
(test_kernels_gpu.py)."""

import ctypes

import pytest
import torch

from gptq_bridge.kernels.cuda import build as cuda_build
from gptq_bridge.kernels.cuda.mma import (
    kernel_spec,
    many_rows_splits,
    shuffle,
    shuffle3,
    unshuffle,
    unshuffle3,
    wgmma_x_index,
)


def random_q(slots, n, seed=0):
    return torch.randint(0, 16, (slots, n), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def test_shuffle_round_trips():
    q = random_q(192, 48)
    words = shuffle(q)
    assert words.shape == (3, 3, 32, 4) and words.dtype == torch.int32
    assert torch.equal(unshuffle(words), q)


def test_shuffle_follows_the_table_in_gptq_mma_cu():
    """Every nibble of every word sits where gptq_mma.cu's comment says: lane (g, t), word j, bits 4b..4b+3 hold
    slot 16t + 4j + (0, 0, 2, 2, 1, 1, 3, 3)[b] of column g + (0, 8)[b % 2] of the tile."""
    q = random_q(128, 32, seed=1)
    words = shuffle(q).to(torch.int64) & 0xFFFFFFFF
    slot_of_bit = {0: 0, 4: 0, 8: 2, 12: 2, 16: 1, 20: 1, 24: 3, 28: 3}
    col_of_bit = {0: 0, 4: 8, 8: 0, 12: 8, 16: 0, 20: 8, 24: 0, 28: 8}
    checked = 0
    for tile in range(2):
        for chunk in range(2):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for j in range(4):
                    word = int(words[tile, chunk, lane, j])
                    for bit in range(0, 32, 4):
                        slot = chunk * 64 + 16 * t + 4 * j + slot_of_bit[bit]
                        col = tile * 16 + g + col_of_bit[bit]
                        assert (word >> bit) & 15 == int(q[slot, col])
                        checked += 1
    assert checked == q.numel()


def a_fragment(words, tile, chunk, j):
    """The 16 x 16 A operand [column in tile, logical k] of k-tile j that a warp's lanes hold for one chunk of q4mma
    words, each value where PTX's m16n8k16 (and, per warp, wgmma's register A) puts fragment elements: registers
    a0..a3 of lane (g, t) are (row, first logical k) = (g, 2t), (g + 8, 2t), (g, 2t + 8), (g + 8, 2t + 8), and a
    pair's two nibbles sit at bits s and s + 16, s = 0, 4, 8, 12."""
    A = torch.zeros(16, 16, dtype=torch.float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        w = int(words[tile, chunk, lane, j])
        for (row, k), shift in zip(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)), (0, 4, 8, 12)):
            A[row, k] = (w >> shift) & 15
            A[row, k + 1] = (w >> (shift + 16)) & 15
    return A


def test_the_fragments_multiply_to_x_times_w():
    """Emulate the kernel's arithmetic on the CPU: per lane and k-tile, the A fragment (dequantized from the
    nibble pairs the lop3 trick extracts: bits 0/16, 4/20, 8/24, 12/28) and the B fragment (two words of the
    lane's 16 consecutive activations), placed where PTX's m16n8k16 puts fragment elements; their products
    summed over k-tiles must be x @ w."""
    slots, n, m = 128, 32, 8
    q = random_q(slots, n, seed=2)
    x = torch.randn(m, slots, dtype=torch.float64)
    words = shuffle(q).to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(n, m, dtype=torch.float64)  # the kernel computes out transposed: columns x rows
    for tile in range(n // 16):
        for chunk in range(slots // 64):
            for j in range(4):
                B = torch.zeros(16, 8, dtype=torch.float64)  # [logical k, row]
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    base = chunk * 64 + 16 * t + 4 * j  # b0: slots base, base + 1; b1: base + 2, base + 3
                    B[2 * t, g], B[2 * t + 1, g] = x[g, base], x[g, base + 1]
                    B[2 * t + 8, g], B[2 * t + 9, g] = x[g, base + 2], x[g, base + 3]
                out[tile * 16 : tile * 16 + 16] += a_fragment(words, tile, chunk, j) @ B
    assert torch.allclose(out.t(), x @ q.double())


def test_the_many_rows_kernel_pairs_each_weight_with_its_activation():
    """Emulate q4_many_rows' data path on the CPU: x gathered by wgmma_x_index and stored tile by tile with
    gather_rows' swizzle (16-byte piece p of row r at p ^ (r % 8)); wgmma reading k-step j of a row through the
    128-byte-swizzle descriptor (logical halves 16j .. 16j + 15, swizzled back); the A fragment of each warp
    from the same words as the few-rows kernel, at the rows and k PTX gives wgmma's register A (mma.sync's A
    per 16 rows). Summed over k-steps, A @ B must be x @ w, with x's columns in act-order (a permutation)."""
    slots, n, m = 128, 32, 16
    q = random_q(slots, n, seed=5)
    perm = torch.randperm(slots, generator=torch.Generator().manual_seed(6))  # slot -> input column
    x = torch.randn(m, slots, dtype=torch.float64)
    idx = wgmma_x_index(perm.to(torch.int32))
    words = shuffle(q).to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(n, m, dtype=torch.float64)
    for chunk in range(slots // 64):
        tile_x = torch.zeros(m, 64, dtype=torch.float64)  # shared memory as stored: [row, halves of 128 bytes]
        for r in range(m):
            for p in range(8):
                for e in range(8):
                    tile_x[r, 8 * (p ^ (r % 8)) + e] = x[r, int(idx[chunk * 64 + 8 * p + e])]
        for j in range(4):
            B = torch.zeros(16, m, dtype=torch.float64)  # [logical k of the step, row]
            for r in range(m):
                for kk in range(16):
                    logical = 16 * j + kk
                    B[kk, r] = tile_x[r, 8 * ((logical // 8) ^ (r % 8)) + logical % 8]
            for tile in range(n // 16):
                out[tile * 16 : tile * 16 + 16] += a_fragment(words, tile, chunk, j) @ B
    x_in_slot_order = x[:, perm]  # slot s reads input column perm[s]
    assert torch.allclose(out.t(), x_in_slot_order @ q.double())


def test_many_rows_splits_fill_the_sms():
    """On 132 SMs: small grids split throughout, a partly filled last wave of at most half the SMs split into the
    parts that fill it, everything else whole (the 70B shapes at m = 512 with 256 rows a block)."""
    assert many_rows_splits(16, 132) == (0, 8)  # 8192x1024
    assert many_rows_splits(64, 132) == (0, 2)  # 8192x8192 at m = 33 (64 rows a block)
    assert many_rows_splits(128, 132) == (128, 1)  # 8192x8192, 28672x8192
    assert many_rows_splits(448, 132) == (396, 2)  # 8192x28672: 3 whole waves, the last 52 tiles in two
    assert many_rows_splits(224, 132) == (224, 1)  # its last wave (92 tiles) is more than half full
    assert many_rows_splits(264, 132) == (264, 1)  # no partial wave


def test_shuffle3_round_trips():
    q = torch.randint(0, 8, (512, 48), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    words = shuffle3(q)
    assert words.shape == (3, 2, 3, 32, 4) and words.dtype == torch.int32
    assert torch.equal(unshuffle3(words), q)
    with pytest.raises(ValueError, match="slots % 256"):
        shuffle3(q[:448])


def raw_pair(w, bits, j, h):
    """gptq_mma.cu's raw_pair<BITS>(w, j, h), operation for operation, on Python ints: (q_lo, q_hi)."""
    if bits == 4:
        r = (w[j] >> (4 * h)) & 0x000F000F
    elif 4 * j + h < 15:
        p = 4 * j + h
        r = (w[p // 5] >> (3 * (p % 5))) & 0x00070007
    else:
        r = ((w[0] >> 15) & 0x00010001) | ((w[1] >> 14) & 0x00020002) | ((w[2] >> 13) & 0x00040004)
    return r & 0xFFFF, r >> 16


@pytest.mark.parametrize("bits", [4, 3])
def test_the_kernels_bit_extraction_finds_every_value_where_the_mma_wants_it(bits):
    """For every lane, chunk, k-tile j and pair h, raw_pair (as the .cu computes it, on the words as the kernel
    loads them: 4-bit one uint4 a chunk, 3-bit word i of chunk u in uint4 i of the quad, component u) yields
    the values of slots s + 2 * (h // 2) + (0, 1), s = 16t + 4j, of column g + 8 * (h % 2): the A fragment pairs
    that test_the_fragments_multiply_to_x_times_w multiplies."""
    slots, n = 256, 32
    q = torch.randint(0, 2**bits, (slots, n), generator=torch.Generator().manual_seed(4), dtype=torch.int32)
    words = (shuffle(q) if bits == 4 else shuffle3(q)).to(torch.int64) & 0xFFFFFFFF
    for tile in range(n // 16):
        for chunk in range(slots // 64):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                if bits == 4:
                    w = [int(v) for v in words[tile, chunk, lane]]
                else:
                    w = [int(words[tile, chunk // 4, i, lane, chunk % 4]) for i in range(3)]
                for j in range(4):
                    for h in range(4):
                        s = chunk * 64 + 16 * t + 4 * j + 2 * (h // 2)
                        col = tile * 16 + g + 8 * (h % 2)
                        assert raw_pair(w, bits, j, h) == (int(q[s, col]), int(q[s + 1, col])), (
                            tile,
                            chunk,
                            lane,
                            j,
                            h,
                        )


def test_kernel_is_registered_with_honest_capabilities():
    from gptq_bridge.config import QuantizeConfig
    from gptq_bridge.types import DeviceInfo

    spec = kernel_spec()
    assert spec.name == "mma" and spec.aliases == {"cuda"} and spec.bits == {3, 4} and spec.devices == {"cuda"}
    assert spec.dtypes == {torch.float16} and spec.min_capability == (8, 0)
    second = DeviceInfo(type="cuda", index=1, capability=(9, 0))  # each call makes its tensors' device current
    assert spec.check_model([], QuantizeConfig(bits=4), second, torch.float16) is None
    if not torch.cuda.is_available():
        assert spec.check_available() == "no CUDA device"


@pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="nvcc not found")
def test_the_library_builds_and_exports_its_functions(tmp_path, monkeypatch):
    """nvcc compiles gptq_mma.cu (for sm_80: no GPU needed to build or to load the library); a second build is a
    cache hit."""
    monkeypatch.setenv("GPTQ_BRIDGE_KERNEL_CACHE", str(tmp_path))
    path = cuda_build.build(archs=[(8, 0)])
    assert path.parent == tmp_path and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    lib = ctypes.CDLL(str(path))
    for name in ("gb_q4_few_rows", "gb_q4_dequantize", "gb_q4_many_rows", "gb_error_string"):
        assert hasattr(lib, name)
    mtime = path.stat().st_mtime_ns
    assert cuda_build.build(archs=[(8, 0)]) == path and path.stat().st_mtime_ns == mtime


@pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="nvcc not found")
def test_the_group_of_a_slot_is_exact_without_a_division(tmp_path, monkeypatch):
    """The kernels find a slot's group as umulhi(n, magic) >> shift (GroupDivider in gptq_mma.cu); the library's
    host copy of that arithmetic, with the same magic numbers, equals n // d for group sizes of every kind (powers
    of two, odd, whole-K groups of the 70B shapes) at the edges of each group and up to 2^31 - 1."""
    monkeypatch.setenv("GPTQ_BRIDGE_KERNEL_CACHE", str(tmp_path))
    group_of = ctypes.CDLL(str(cuda_build.build(archs=[(8, 0)]))).gb_group_of
    group_of.argtypes, group_of.restype = [ctypes.c_uint, ctypes.c_uint], ctypes.c_uint
    gen = torch.Generator().manual_seed(5)
    top = 2**31 - 1
    for d in (2, 3, 7, 16, 32, 48, 64, 96, 128, 160, 4096, 8192, 11008, 28672, 65536, 98304, 2**20 + 1, top):
        edges = {0, 1, d - 1, d, d + 1, top, top - 1, top // d * d, top // d * d - 1}
        edges |= {q * d + r for q in (2, 3, 1000, top // d - 1) for r in (-1, 0, 1) if 0 <= q * d + r <= top}
        samples = sorted(edges | set(torch.randint(0, top, (300,), generator=gen).tolist()))
        got = [group_of(n, d) for n in samples]
        assert got == [n // d for n in samples], d


@pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="nvcc not found")
def test_the_hopper_build_has_the_wgmma_kernel(tmp_path, monkeypatch):
    """For compute capability 9.0 the library is built as sm_90a, where gptq_wgmma.cuh's wgmma code exists; its
    source is part of the cache key."""
    monkeypatch.setenv("GPTQ_BRIDGE_KERNEL_CACHE", str(tmp_path))
    cmd = cuda_build._nvcc_command("nvcc", [(8, 0), (9, 0)], tmp_path / "x.so", cuda_build.SOURCE)
    assert "arch=compute_90a,code=sm_90a" in cmd and "arch=compute_80,code=sm_80" in cmd
    path = cuda_build.build(archs=[(9, 0)])
    assert hasattr(ctypes.CDLL(str(path)), "gb_q4_many_rows")


def test_a_missing_nvcc_is_a_clear_build_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTQ_BRIDGE_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(cuda_build.BuildError, match="nvcc"):
        cuda_build.build(nvcc=str(tmp_path / "no-nvcc-here"), archs=[(8, 0)])


@pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="nvcc not found")
def test_a_failing_build_names_the_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTQ_BRIDGE_KERNEL_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.cu"
    broken.write_text('extern "C" int f() { return undefined_name; }\n')
    with pytest.raises(cuda_build.BuildError) as info:
        cuda_build.build(archs=[(8, 0)], source=broken)
    first = str(info.value).splitlines()[0]
    assert first.startswith("nvcc failed to build broken.cu:") and "undefined_name" in first
    assert list((tmp_path / "cache").iterdir()) == []


def test_scratch_is_shared_per_device_and_dtype_and_grows():
    """The split-K partials (float32) and the gathered activations (float16) each get one buffer per device:
    smaller requests reuse it, a larger one replaces it, and the two dtypes never share memory."""
    from gptq_bridge.kernels.base import scratch, split_k_workspace

    cpu = torch.device("cpu")
    a = scratch(cpu, 100, torch.float16)
    assert a.dtype == torch.float16 and a.numel() >= 100
    assert scratch(cpu, 10, torch.float16).data_ptr() == a.data_ptr()
    b = split_k_workspace(cpu, 100)
    assert b.dtype == torch.float32 and b.data_ptr() != a.data_ptr()
    c = scratch(cpu, a.numel() + 1, torch.float16)
    assert c.numel() > a.numel() and scratch(cpu, 1, torch.float16).data_ptr() == c.data_ptr()
