"""The project's own Triton kernels: fused dequantize + matmul for every GPTQ setting (2/3/4/8 bits, any
group size, act-order, v1/v2 zeros, sym/asym).

Layout, decided once in `prepare()`: rows sorted by group (`slot_layout`): each run of `P` consecutive slots
is one group, so a kernel never gathers scales per row and reads the activations through `perm` instead.
Zero points become one float16 per (group, column) (exact for every bit width, v1's +1 applied).

Three paths (forward() picks by the number of rows m: decode up to DECODE_UP_TO_M, gemm below
CUBLAS_MIN_M, dequant + cuBLAS from there; each path can also be called on its own):
- decode (m <= 16): bandwidth-bound. Split-K over a grid that fills every SM; each program reads the packed
  words once and dequantizes each field with a mask and one float add: `(w & (mask << pos)) | 0x4B000000`
  is the float 2**23 + q * 2**pos, so `f - (2**23 + z * 2**pos)` is exactly (q - z) * 2**pos with no
  integer-to-float conversion (a slow instruction on NVIDIA GPUs) and no shift per value; the 2**-pos is
  folded into the activation. 4-bit with fp16 activations and one row uses packed half2 math instead
  (`_HALF2_DOT`). Scales multiply once per 32-row block. The split partials are summed by the last program
  of each column tile (a counter that resets itself), so a call is one launch.
- gemm: dequantize a [BLOCK_K, BLOCK_N] tile in registers and feed the tensor cores (`tl.dot`).
- dequant + cuBLAS: write the fp16 weight once per call and call torch.matmul.

Triton's interpreter (TRITON_INTERPRET=1) runs the same kernels on CPU tensors; the kernels are jitted
lazily, at first use, because the interpreter switch is read when `triton.jit` wraps a function.
"""

import os

import torch

from ..config import QuantizeConfig
from ..hookspecs import hookimpl
from ..types import KernelSpec, LayerShape
from .base import GPTQLinear, scratch_lock, split_k_workspace
from .measured import MEASURED_US
from .slot_layout import sort_rows_by_group, zero_points

try:  # triton is optional: without it the kernel registers as unavailable, with the reason
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except Exception as exc:  # ImportError, or a broken install raising something else
    triton = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

    class tl:  # stand-in so the kernel definitions below (annotations, constants) still evaluate
        @staticmethod
        def constexpr(value=None):
            return value


# One 4-bit word (8 values of one column, rows j and j + 4 paired) times 8 activations packed as 4 half2:
# (w >> 4j) & 0x000F000F | 0x54005400 is the half2 (64 + q_j / 16, 64 + q_j+4 / 16) (one LOP3; the fp16
# spacing at 64 is 1/16), minus 64 + z / 16 is exactly (q - z) / 16; four half2 FMAs, then the two halves are
# summed in float32 (and multiplied by 16 once per block). At most 4 products are summed in half precision,
# each at most |x|, so activations up to ~16,000 cannot overflow.
_HALF2_DOT = tl.constexpr("""
{
.reg .b32 t, h, a;
.reg .f16 lo, hi;
.reg .f32 flo, fhi;
lop3.b32 h, $1, 0x000F000F, 0x54005400, 0xEA;
sub.f16x2 h, h, $2;
mul.rn.f16x2 a, h, $3;
shr.u32 t, $1, 4;
lop3.b32 h, t, 0x000F000F, 0x54005400, 0xEA;
sub.f16x2 h, h, $2;
fma.rn.f16x2 a, h, $4, a;
shr.u32 t, $1, 8;
lop3.b32 h, t, 0x000F000F, 0x54005400, 0xEA;
sub.f16x2 h, h, $2;
fma.rn.f16x2 a, h, $5, a;
shr.u32 t, $1, 12;
lop3.b32 h, t, 0x000F000F, 0x54005400, 0xEA;
sub.f16x2 h, h, $2;
fma.rn.f16x2 a, h, $6, a;
mov.b32 {lo, hi}, a;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}
""")

# Launching through `kernel[grid](...)` costs ~45 us of host time a call on the H100 machine
# (bench/host_overhead.py): triton binds and re-specializes every argument and builds a cache key each time. A
# layer calls with the same shapes over and over, so each TritonQuantLinear keeps, per (path, rows, dtype,
# device, stride, alignment of x), a plan: grid, constants, workspace and the compiled kernel, which later calls
# launch directly (`compiled[grid](*all_parameters)`). How a compiled kernel takes its arguments is up to the
# triton version: that path is used on the versions it was checked on (tests/gpu), the public one elsewhere.
_FAST_LAUNCH_VERSIONS = ("3.6.",)


class _Plan:
    """One launch configuration of one layer: everything but the per-call tensors."""

    __slots__ = ("kernel", "grid", "consts", "options", "ints", "ws", "compiled")

    def __init__(self, kernel, grid, consts, options, ints, ws=None):
        self.kernel, self.grid, self.consts, self.options, self.ints, self.ws = kernel, grid, consts, options, ints, ws
        self.compiled = None

    def launch(self, tensors: tuple) -> None:
        args = tensors + self.ints
        c = self.compiled
        if c is None:
            compiled = self.kernel[self.grid](*args, **self.consts, **self.options)
            if not _interpreting() and triton.__version__.startswith(_FAST_LAUNCH_VERSIONS):
                self.compiled = compiled  # the same specialization serves every later call of this plan
            return
        # a compiled kernel takes every parameter, constexprs too; the kernels list theirs last, in this order
        c[self.grid](*args, *self.consts.values())


_MAGIC = 0x4B000000  # float32 bit pattern of 2**23; OR-ing an integer below 2**23 into it adds that integer


# ----------------------------------------------------------------------------------------------------------
# Kernels (plain functions; jitted on first use by `_jit`)
# ----------------------------------------------------------------------------------------------------------


def _decode_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    perm_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    NBLK,
    P,
    stride_xm,
    stride_om,
    magic,
    tiles,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HALF2: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * w[k, n] for few rows m; program (n-tile, k-split), one 32-row block a step.

    Every tensor is 2-D with a leading row axis of 1 or BLOCK_M, so all share one register layout and the
    compiler inserts no layout conversions (a 3-D [m, r, n] version spent half its time in shared memory).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # [1, BN]
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)[:, None]  # [BM, 1]
    mask_m = offs_m < M
    MASKV: tl.constexpr = (1 << BITS) - 1
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # `tiles` blocks per split; the host makes every split non-empty, blocks past the end are masked.
    for i in range(tiles):
        blk = pid_k * tiles + i
        valid = blk < NBLK
        wmask = mask_n & valid
        grp = (blk * 32) // P
        zf = tl.load(z_ptr + grp * N + offs_n, mask=wmask, other=0.0).to(tl.float32)
        sc = tl.load(s_ptr + grp * N + offs_n, mask=wmask, other=0.0).to(tl.float32)
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HALF2:  # 4-bit, fp16 activations, one row: packed half2 arithmetic (see _HALF2_DOT)
            zh = (zf * 0.0625 + 64.0).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            c2 = zh | (zh << 16)  # 64 + z / 16 in both halves (exact)
            for wi in tl.static_range(4):
                w = tl.load(qw_ptr + (blk * 4 + wi) * N + offs_n, mask=wmask, other=0)
                k0 = blk * 32 + wi * 8
                if HAS_PERM:
                    row0 = tl.load(perm_ptr + k0 + 0, mask=valid, other=-1)
                    row1 = tl.load(perm_ptr + k0 + 1, mask=valid, other=-1)
                    row2 = tl.load(perm_ptr + k0 + 2, mask=valid, other=-1)
                    row3 = tl.load(perm_ptr + k0 + 3, mask=valid, other=-1)
                    row4 = tl.load(perm_ptr + k0 + 4, mask=valid, other=-1)
                    row5 = tl.load(perm_ptr + k0 + 5, mask=valid, other=-1)
                    row6 = tl.load(perm_ptr + k0 + 6, mask=valid, other=-1)
                    row7 = tl.load(perm_ptr + k0 + 7, mask=valid, other=-1)
                else:
                    row0 = tl.where(k0 + 0 < K, k0 + 0, -1)
                    row1 = tl.where(k0 + 1 < K, k0 + 1, -1)
                    row2 = tl.where(k0 + 2 < K, k0 + 2, -1)
                    row3 = tl.where(k0 + 3 < K, k0 + 3, -1)
                    row4 = tl.where(k0 + 4 < K, k0 + 4, -1)
                    row5 = tl.where(k0 + 5 < K, k0 + 5, -1)
                    row6 = tl.where(k0 + 6 < K, k0 + 6, -1)
                    row7 = tl.where(k0 + 7 < K, k0 + 7, -1)
                x0 = (
                    tl.load(x_ptr + row0, mask=valid & (row0 >= 0), other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
                    & 0xFFFF
                )
                x1 = (
                    tl.load(x_ptr + row1, mask=valid & (row1 >= 0), other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
                    & 0xFFFF
                )
                x2 = (
                    tl.load(x_ptr + row2, mask=valid & (row2 >= 0), other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
                    & 0xFFFF
                )
                x3 = (
                    tl.load(x_ptr + row3, mask=valid & (row3 >= 0), other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
                    & 0xFFFF
                )
                x4 = (
                    tl.load(x_ptr + row4, mask=valid & (row4 >= 0), other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
                    & 0xFFFF
                )
                x5 = (
                    tl.load(x_ptr + row5, mask=valid & (row5 >= 0), other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
                    & 0xFFFF
                )
                x6 = (
                    tl.load(x_ptr + row6, mask=valid & (row6 >= 0), other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
                    & 0xFFFF
                )
                x7 = (
                    tl.load(x_ptr + row7, mask=valid & (row7 >= 0), other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
                    & 0xFFFF
                )
                # half2 pairs (row j, row j + 4): the nibbles at bits 4j and 4j + 16 of the word
                p0 = tl.broadcast_to(x0 | (x4 << 16), [1, BLOCK_N])
                p1 = tl.broadcast_to(x1 | (x5 << 16), [1, BLOCK_N])
                p2 = tl.broadcast_to(x2 | (x6 << 16), [1, BLOCK_N])
                p3 = tl.broadcast_to(x3 | (x7 << 16), [1, BLOCK_N])
                part += tl.inline_asm_elementwise(
                    _HALF2_DOT, "=f,r,r,r,r,r,r", [w, c2, p0, p1, p2, p3], dtype=tl.float32, is_pure=True, pack=1
                )
            part = part * 16.0  # the weights came out as (q - z) / 16, so 4 half products cannot overflow
        else:
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            prev = tl.zeros([1, BLOCK_N], dtype=tl.int32)
            for wi in tl.static_range(BITS):
                w = tl.load(qw_ptr + (blk * BITS + wi) * N + offs_n, mask=wmask, other=0)
                hi = w >> 16
                for v in tl.static_range(32):
                    # value v of the block occupies bits [v*BITS, v*BITS + BITS) of the block's bit stream;
                    # handle it in the word where it ends (a 3-bit value may start in the previous word)
                    if (v * BITS + BITS - 1) // 32 == wi:
                        off = (v * BITS) % 32
                        if off + BITS > 32:  # straddles prev -> w (3-bit values 10 and 21)
                            nlo = 32 - off
                            q = ((prev >> off) & ((1 << nlo) - 1)) | ((w & ((1 << (BITS - nlo)) - 1)) << nlo)
                            pos = 0
                            f = (q | magic).to(tl.float32, bitcast=True)
                        elif off < 16:
                            pos = off
                            f = ((w & (MASKV << pos)) | magic).to(tl.float32, bitcast=True)
                        else:
                            pos = off - 16
                            f = ((hi & (MASKV << pos)) | magic).to(tl.float32, bitcast=True)
                        d = f - (8388608.0 + zf * (1 << pos))  # (q - z) * 2**pos, exact
                        k = blk * 32 + v
                        if HAS_PERM:
                            row = tl.load(perm_ptr + k, mask=valid, other=-1)
                            xmask = mask_m & valid & (row >= 0)
                        else:
                            row = k
                            xmask = mask_m & valid & (k < K)
                        xv = tl.load(x_ptr + offs_m * stride_xm + row, mask=xmask, other=0.0).to(tl.float32)
                        part += (xv * (1.0 / (1 << pos))) * d
                prev = w
        acc += part * sc

    omask = mask_m & mask_n
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(ws_ptr + (pid_k * BLOCK_M + offs_m) * N + offs_n, acc, mask=omask)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if done == SPLIT - 1:  # the last split of this column tile sums all partials
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT):
                total += tl.load(
                    ws_ptr + (s * BLOCK_M + offs_m) * N + offs_n, mask=omask, other=0.0, cache_modifier=".cg"
                )
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs_m * stride_om + offs_n, total.to(out_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next call


def _weight_tile_fn(
    qw_ptr, zf, sc, t, offs_n, mask_n, N, KS, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Slot tile `t` of the weight, dequantized to float32 [BLOCK_K, BLOCK_N]: (q - z) * s.

    zf, sc: the tile's group zero points and scales [BLOCK_N]; slots past KS read as q = 0.
    """
    k = t * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < KS
    MASKV: tl.constexpr = (1 << BITS) - 1
    if BITS == 3:  # values straddle words: address every row's word(s)
        bit = (k % 32) * BITS
        word = (k // 32) * BITS + bit // 32
        off = bit % 32
        w = tl.load(qw_ptr + word[:, None] * N + offs_n[None, :], mask=kmask[:, None] & mask_n[None, :], other=0)
        spill = (off + BITS > 32) & kmask
        w2 = tl.load(qw_ptr + (word + 1)[:, None] * N + offs_n[None, :], mask=spill[:, None] & mask_n[None, :], other=0)
        low = (w.to(tl.uint32, bitcast=True) >> off[:, None]).to(tl.int32, bitcast=True)  # logical shift
        q = (low & MASKV) | (((w2 << 1) << (31 - off)[:, None]) & MASKV)
    else:  # 32 // BITS values per word, in row order: load each word once and spread it
        VPW: tl.constexpr = 32 // BITS
        r = t * (BLOCK_K // VPW) + tl.arange(0, BLOCK_K // VPW)
        w = tl.load(qw_ptr + r[:, None] * N + offs_n[None, :], mask=(r < KS // VPW)[:, None] & mask_n[None, :], other=0)
        sh = tl.arange(0, VPW) * BITS
        q = tl.reshape((w[:, None, :] >> sh[None, :, None]) & MASKV, [BLOCK_K, BLOCK_N])
    # (q | 0x4B000000) is the float 2**23 + q: exact, no integer-to-float conversion
    return ((q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + zf)[None, :]) * sc[None, :]


_weight_tile = None  # triton.jit(_weight_tile_fn) for the current mode, bound by _jit() before any launch


def _gemm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    KX,
    KS,
    P,
    stride_xm,
    stride_om,
    tiles,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
):
    """out = x_slots @ dequant(qw) on the tensor cores; x_slots is x already in slot order (KX columns).

    (Gathering x through perm inside this kernel was measured: faster at m <= 8 on the small shapes, up to 6x
    slower from m = 32 on, where every column tile re-reads x two bytes at a time.)"""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m  # neighbouring programs share a weight tile: it is read from DRAM once
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(tiles):
        t = pid_k * tiles + i
        k = t * BLOCK_K + offs_k
        g = (t * BLOCK_K) // P  # BLOCK_K divides P: one group per tile
        tmask = mask_n & (t * BLOCK_K < KS)  # the last split may run past the end: read nothing there
        zf = tl.load(z_ptr + g * N + offs_n, mask=tmask, other=0.0).to(tl.float32)
        sc = tl.load(s_ptr + g * N + offs_n, mask=tmask, other=0.0).to(tl.float32)
        wf = _weight_tile(qw_ptr, zf, sc, t, offs_n, mask_n, N, KS, BITS, BLOCK_K, BLOCK_N)
        xt = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & (k < KX)[None, :], other=0.0
        )
        if IEEE:
            acc = tl.dot(xt, wf.to(xt.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wf.to(xt.dtype), acc)

    omask = mask_m[:, None] & mask_n[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(ws_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=omask)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if done == SPLIT - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT):
                total += tl.load(
                    ws_ptr + (s * M + offs_m[:, None]) * N + offs_n[None, :],
                    mask=omask,
                    other=0.0,
                    cache_modifier=".cg",
                )
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(
                out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], total.to(out_ptr.dtype.element_ty), mask=omask
            )
            tl.atomic_xchg(cnt_ptr + pid, 0)


def _dequant_kernel(
    qw_ptr,
    s_ptr,
    z_ptr,
    perm_ptr,
    w_ptr,
    N,
    K,
    KS,
    P,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_PERM: tl.constexpr,
):
    """w[row, n] = (q - z) * s in the original row order (rows scattered back through perm)."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k = t * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < KS
    g = (t * BLOCK_K) // P
    zf = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    sc = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    wf = _weight_tile(qw_ptr, zf, sc, t, offs_n, mask_n, N, KS, BITS, BLOCK_K, BLOCK_N)
    if HAS_PERM:
        row = tl.load(perm_ptr + k, mask=kmask, other=-1)
    else:
        row = k
    rmask = kmask & (row >= 0) & (row < K)
    tl.store(
        w_ptr + row[:, None] * N + offs_n[None, :], wf.to(w_ptr.dtype.element_ty), mask=rmask[:, None] & mask_n[None, :]
    )


_JITTED: dict[bool, dict[str, object]] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fix_interpreter_index() -> None:
    """Let triton's interpreter use a run-time scalar as a loop bound under numpy >= 2.4.

    triton 3.6's interpreter turns a scalar into a Python int with int() on a 1-element array, which numpy
    2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); triton 3.9 squeezes first.
    Do the same, for the interpreter only (it patches its own tensor class on every launch).
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_gptq_bridge_fix", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch._gptq_bridge_fix = True
    interpreter._patch_lang_tensor = patch


def _jit() -> dict[str, object]:
    """The jitted kernels for the current mode (interpreter or compiled), built on first use."""
    global _weight_tile
    mode = _interpreting()
    if mode not in _JITTED:
        if triton is None:
            raise RuntimeError(f"triton is not importable ({_IMPORT_ERROR})")
        if mode:
            _fix_interpreter_index()
        # triton.jit reads TRITON_INTERPRET when it wraps a function, so wrap here, not at import. The kernels
        # call the helper through the module global, so only one mode's kernels exist at a time.
        _JITTED.clear()
        _weight_tile = triton.jit(_weight_tile_fn)
        _JITTED[mode] = {
            "decode": triton.jit(_decode_kernel),
            "gemm": triton.jit(_gemm_kernel),
            "dequant": triton.jit(_dequant_kernel),
        }
    return _JITTED[mode]


# ----------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------

DECODE_MAX_M = 16  # the decode kernel takes at most this many rows
# Dispatch by rows m, from bench/kernels.py on the H100 (docs/PERFORMANCE.md): the decode kernel up to
# DECODE_UP_TO_M rows, the fused tensor-core kernel up to CUBLAS_MIN_M, dequantize + cuBLAS from there on.
DECODE_UP_TO_M = 2
CUBLAS_MIN_M = 128


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _pow2_divisor(n: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


# ----------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------


class TritonQuantLinear(GPTQLinear):
    """GPTQ Linear served by the Triton kernels; `prepare()` builds the slot layout described above."""

    def __init__(self, layer: LayerShape, config: QuantizeConfig, dtype: torch.dtype):
        super().__init__(layer, config, dtype)
        self._ready = False
        self.decode_config: dict | None = None  # overrides for benchmarks: BLOCK_N, R, SPLIT, num_warps
        self.gemm_config: dict | None = None
        self.dequant_config: dict | None = None
        self._plans: dict[tuple, _Plan] = {}  # launch plans by (path, rows, dtype, device, ...): see _Plan

    def _apply(self, fn, *args, **kwargs):
        """.to() / .cuda() / .half() can change the buffers' device or dtype, which the plans' kernels were
        compiled for: forget the plans."""
        self._plans = {}
        return super()._apply(fn, *args, **kwargs)

    # --- layout ---------------------------------------------------------------------------------------

    def prepare(self) -> None:
        if self._ready:
            return
        dev = self.qweight.device
        K = self.in_features
        layout = sort_rows_by_group(self)
        qw, perm = layout.qweight, layout.perm
        if perm is not None:  # one copy of the weights in memory: the sorted words replace the on-disk ones
            self.qweight = torch.empty(0, dtype=torch.int32, device=dev)
        z = zero_points(self)
        self.register_buffer("tq_qweight", qw.contiguous(), persistent=False)
        self.register_buffer("tq_zeros", z.to(torch.float16).contiguous(), persistent=False)
        self.register_buffer("tq_scales", self.scales.contiguous(), persistent=False)
        self.register_buffer("tq_perm", perm, persistent=False)
        # the gemm path's gather of x into slot order; pad slots point at a zero column K appended to x
        # (registered only where it differs from perm: one tensor under two buffer names would be copied twice
        # by .to())
        self._x_pad = perm is not None and bool((perm < 0).any())
        xidx = torch.where(perm >= 0, perm, K).to(torch.int32) if self._x_pad else None
        self.register_buffer("tq_xidx", xidx, persistent=False)
        self.slots, self.slots_per_group = layout.slots, layout.slots_per_group
        self.register_buffer("tq_counters", torch.zeros(4096, dtype=torch.int32, device=dev), persistent=False)
        self._ready = True

    # --- paths ----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        if m <= DECODE_UP_TO_M:
            out = self.forward_decode(x2)
        elif m >= CUBLAS_MIN_M and x2.is_cuda:
            out = self.forward_dequant(x2)
        else:
            out = self.forward_gemm(x2)
        return out.reshape(*shape[:-1], self.out_features)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not self._ready:
            raise RuntimeError("prepare() was not called on this layer (the loader calls it after loading)")
        if x.stride(-1) != 1:
            x = x.contiguous()
        return x

    def forward_decode(self, x: torch.Tensor) -> torch.Tensor:
        """Few rows (m <= 16): split-K, bandwidth-bound."""
        x = self._check(x)
        plan = self._plan(
            ("decode", x.shape[0], x.dtype, x.device, x.stride(0), x.data_ptr() % 16), self._decode_plan, x
        )
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        perm, bias = self.tq_perm, self.bias
        with scratch_lock(x.device):
            ws = split_k_workspace(x.device, plan.ws) if plan.ws else out
            plan.launch(
                (
                    x,
                    self.tq_qweight,
                    self.tq_scales,
                    self.tq_zeros,
                    perm if perm is not None else x,
                    bias if bias is not None else x,
                    out,
                    ws,
                    self.tq_counters,
                )
            )
        return out

    def _decode_plan(self, x: torch.Tensor) -> _Plan:
        M, N = x.shape[0], self.out_features
        if M > DECODE_MAX_M:
            raise ValueError(f"the decode kernel takes at most {DECODE_MAX_M} rows, got {M}")
        cfg = self.decode_config or {}
        block_m = max(1, triton.next_power_of_2(M))
        # measured (bench/kernels.py sweep, H100): 256 columns a program for 8192x1024, 512 for 8192x8192,
        # 2048 for the 28672-wide ones; 4 warps
        block_n = cfg.get("BLOCK_N", 256 if N <= 2048 else 512 if self.in_features * N < 100_000_000 else 2048)
        nblk = self.slots // 32
        n_tiles = -(-N // block_n)
        split = cfg.get("SPLIT")
        if split is None:
            want = 4 * _sm_count(x.device)
            split = max(1, min(nblk, -(-want // n_tiles), 64))  # 128 measured slower (8192x1024: 33 vs 23 us)
        tiles_per_split = -(-nblk // split)
        split = -(-nblk // tiles_per_split)  # no empty splits
        self._counters(n_tiles if split > 1 else 0)
        consts = dict(
            BITS=self.bits,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            SPLIT=split,
            HAS_PERM=self.tq_perm is not None,
            HAS_BIAS=self.bias is not None,
            HALF2=cfg.get("HALF2", True)
            and self.bits == 4
            and block_m == 1
            and x.dtype == torch.float16
            and not _interpreting(),
        )
        ints = (M, N, self.in_features, nblk, self.slots_per_group, x.stride(0), N, _MAGIC, tiles_per_split)
        return _Plan(
            _jit()["decode"],
            (n_tiles, split, 1),
            consts,
            dict(num_warps=cfg.get("num_warps", 4)),
            ints,
            ws=split * block_m * N if split > 1 else 0,
        )

    def forward_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows: dequantize tiles in registers, multiply on the tensor cores."""
        x = self._slot_x(self._check(x))
        plan = self._plan(("gemm", x.shape[0], x.dtype, x.device, x.stride(0), x.data_ptr() % 16), self._gemm_plan, x)
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        bias = self.bias
        with scratch_lock(x.device):
            ws = split_k_workspace(x.device, plan.ws) if plan.ws else out
            plan.launch(
                (
                    x,
                    self.tq_qweight,
                    self.tq_scales,
                    self.tq_zeros,
                    bias if bias is not None else x,
                    out,
                    ws,
                    self.tq_counters,
                )
            )
        return out

    def _slot_x(self, x: torch.Tensor) -> torch.Tensor:
        """x with its columns in slot order: one gather (pad slots read the zero column K appended to x)."""
        if self.tq_perm is None:
            return x
        if self._x_pad:
            return torch.nn.functional.pad(x, (0, 1)).index_select(1, self.tq_xidx)
        return x.index_select(1, self.tq_perm)

    def _gemm_plan(self, x: torch.Tensor) -> _Plan:
        M, N = x.shape[0], self.out_features
        cfg = self.gemm_config or {}
        block_m = cfg.get("BLOCK_M", 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128)
        block_n = cfg.get("BLOCK_N", 128)
        block_k = min(cfg.get("BLOCK_K", 128 if M <= 16 else 64), _pow2_divisor(self.slots_per_group, 128))
        stages = cfg.get("num_stages", 3)
        if self.bits == 3:  # its per-row word addressing needs more shared memory per stage
            block_k, block_n, stages = min(block_k, 64), min(block_n, 128), min(stages, 2)
        n_tiles = -(-M // block_m) * -(-N // block_n)
        k_tiles = -(-self.slots // block_k)
        split = cfg.get("SPLIT")
        if split is None:
            want = 2 * _sm_count(x.device)
            split = max(1, min(k_tiles, -(-want // n_tiles), 32)) if n_tiles < want else 1
        tiles_per_split = -(-k_tiles // split)
        split = -(-k_tiles // tiles_per_split)
        self._counters(n_tiles if split > 1 else 0)
        consts = dict(
            BITS=self.bits,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            SPLIT=split,
            HAS_BIAS=self.bias is not None,
            IEEE=x.dtype == torch.float32,
        )
        ints = (M, N, x.shape[1], self.slots, self.slots_per_group, x.stride(0), N, tiles_per_split)
        options = dict(num_warps=cfg.get("num_warps", 4 if block_m <= 64 else 8), num_stages=stages)
        return _Plan(_jit()["gemm"], (n_tiles, split, 1), consts, options, ints, ws=split * M * N if split > 1 else 0)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [in, out] in `dtype`, rows in their original order (one kernel launch)."""
        if not self._ready:
            raise RuntimeError("prepare() was not called on this layer")
        dev = self.tq_qweight.device
        plan = self._plan(("dequant", dtype, dev), self._dequant_plan)
        w = torch.empty(self.in_features, self.out_features, dtype=dtype, device=dev)
        perm = self.tq_perm
        plan.launch((self.tq_qweight, self.tq_scales, self.tq_zeros, perm if perm is not None else w, w))
        return w

    def _dequant_plan(self) -> _Plan:
        cfg = self.dequant_config or {}
        block_k = min(cfg.get("BLOCK_K", 64), _pow2_divisor(self.slots_per_group, 128))
        block_n = cfg.get("BLOCK_N", 256)
        consts = dict(BITS=self.bits, BLOCK_N=block_n, BLOCK_K=block_k, HAS_PERM=self.tq_perm is not None)
        grid = (-(-self.slots // block_k), -(-self.out_features // block_n), 1)
        ints = (self.out_features, self.in_features, self.slots, self.slots_per_group)
        return _Plan(_jit()["dequant"], grid, consts, dict(num_warps=cfg.get("num_warps", 4)), ints)

    def _plan(self, key: tuple, build, *args) -> _Plan:
        """The plan for `key` (path first), built on first use; the benchmark's launch overrides
        (`<path>_config`, None in normal use) take part in the key."""
        cfg = getattr(self, f"{key[0]}_config")
        key += (None if cfg is None else tuple(sorted(cfg.items())),)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build(*args)
        return plan

    def _counters(self, n: int) -> None:
        """Split-K arrival counters: one per column tile, zero between calls (the last program resets its own)."""
        if n > self.tq_counters.numel():
            self.tq_counters = torch.zeros(n, dtype=torch.int32, device=self.tq_counters.device)

    def forward_dequant(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows: write the fp16 weight once, then cuBLAS."""
        x = self._check(x)
        out = x @ self.dequantize(x.dtype)
        return out + self.bias if self.bias is not None else out


# ----------------------------------------------------------------------------------------------------------
# Registration and selection order
# ----------------------------------------------------------------------------------------------------------


def _priority() -> int:
    """Rank for bit widths without measured speeds: above torch (0) on the GPU; last under TRITON_INTERPRET=1 (a
    test mode: numpy runs every program), so "auto" never picks the interpreter and `kernel="triton"` still can."""
    return -10 if _interpreting() else 10


def _check_available() -> str | None:
    if triton is None:
        return f"triton is not importable ({_IMPORT_ERROR})"
    if not _interpreting() and not torch.cuda.is_available():
        return "no CUDA device (on the CPU, triton runs only in its interpreter: set TRITON_INTERPRET=1)"
    return None


def _check_layer(layer: LayerShape, config: QuantizeConfig) -> str | None:
    if layer.in_features % 32:
        return "input features must be a multiple of 32 (GPTQ packs 32 rows at a time)"
    return None


def kernel_spec() -> KernelSpec:
    devices = {"cuda"} | ({"cpu"} if _interpreting() else set())
    return KernelSpec(
        name="triton",
        description="gptq-bridge's Triton kernels: fused dequantize + matmul, split-K decode "
        "(CPU only under TRITON_INTERPRET=1)",
        bits=frozenset({2, 3, 4, 8}),
        devices=frozenset(devices),
        measured_us=MEASURED_US["triton"],
        priority=_priority(),
        factory=TritonQuantLinear,
        check_available=_check_available,
        check_layer=_check_layer,
    )


@hookimpl
def gptq_register_kernels(register):
    register(kernel_spec())
