"""The project's CUDA kernel for 3- and 4-bit checkpoints (gptq_mma.cu, gptq_wgmma.cuh): tensor-core decode for few
rows, and on Hopper a wgmma kernel for many.

`prepare()` sorts the rows by group (slot_layout) and shuffles the values into the layout gptq_mma.cu describes:
each lane of a warp loads exactly the values its mma fragments need, 4-bit ("q4mma") in one 16-byte read a
64-slot chunk, 3-bit ("q3mma") in three 16-byte reads a quad of chunks. Scales and zero points become one
(scale, 1024 + zero) half2 per group and column.

forward() by rows m:
- m <= 32: one launch of `q4_few_rows` (split-K, partials summed by the last block of each column block), after
  one gather of x into slot order when the rows were sorted (act-order) or x is not 16-byte aligned, both from
  one call into the library;
- m > 32 on Hopper (compute capability 9.0): one call, which gathers x into wgmma's k order, then launches
  `q4_many_rows` (gptq_wgmma.cuh: warpgroup MMA with the weight dequantized in registers, x through shared memory;
  split-K for small grids), except where dequantize + cuBLAS measured faster (`_many_rows_wins`);
- m > 32 elsewhere: the weight is dequantized into float16 once per call, then cuBLAS.
Float16 activations only (the spec says so; selection keeps other dtypes away).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...config import QuantizeConfig
from ...errors import KernelError
from ...hookspecs import hookimpl
from ...packing import unpack
from ...types import KernelSpec, LayerShape
from ..base import GPTQLinear, scratch, scratch_lock, split_k_workspace
from ..measured import MEASURED_US
from ..slot_layout import sort_rows_by_group, zero_points
from . import build as cuda_build

FEW_ROWS_MAX_M = 32  # q4_few_rows handles up to 4 tiles of 8 rows
MANY_ROWS_COLS = 128  # q4_many_rows' block: 128 columns of 64, 128 or 256 rows (many_rows_tile)
WGMMA_MAX_IN_FEATURES = 96 * 1024  # its gather holds a row of x in shared memory (gptq_wgmma.cuh, kGatherRowsMaxK)
BITS = (3, 4)
BATCH_CHUNKS = 4  # chunks (64 slots each) q4_few_rows loads together; chunks and splits are whole batches
# The current stream's handle as an int: torch's own fast path (what Triton's launcher uses), ~7 us less per call
# than torch.cuda.current_stream(device).cuda_stream on the H100 machine (bench/host_overhead.py).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream
)
_SHUFFLE_COLUMNS = 1024
_SLOT_ORDER = [0, 2, 1, 3]  # nibble pair p (bits 8p..8p+7, interleaved by column half) holds slot offset this


def shuffle(q: torch.Tensor) -> torch.Tensor:
    """4-bit values [slots, N] (slots a multiple of 64, N of 16) -> q4mma words, int32 [N/16, slots/64, 32, 4]."""
    S, N = q.shape
    if S % 64 or N % 16:
        raise ValueError(f"q4mma needs slots % 64 == 0 and N % 16 == 0, got {S} x {N}")
    v = q.to(torch.int64).view(S // 64, 4, 4, 4, N // 16, 2, 8)  # chunk, t, j, slot offset, tile, half, g
    v = v[:, :, :, _SLOT_ORDER].permute(4, 0, 6, 1, 2, 3, 5)  # tile, chunk, g, t, j, pair, half
    v = v.reshape(N // 16, S // 64, 32, 4, 8)  # lane = 4g + t; nibble b = 2 * pair + half
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (v << shifts).sum(-1)
    return _as_int32(words)


def unshuffle(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `shuffle`: q4mma words -> 4-bit values [slots, N] (int32)."""
    tiles, chunks = words.shape[:2]
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    v = (words.view(tiles, chunks, 8, 4, 4, 1, 1) >> shifts.view(4, 2)) & 15  # tile, chunk, g, t, j, pair, half
    v = v.permute(1, 3, 4, 5, 0, 6, 2)  # chunk, t, j, pair, tile, half, g
    out = torch.empty_like(v)
    out[:, :, :, _SLOT_ORDER] = v
    return out.reshape(chunks * 64, tiles * 16)


class ManyRowsPlan(NamedTuple):
    """How gb_q4_many_rows runs for a row count: rows a block; tiles from `whole` on split into `splits` of
    `per_split` chunks; float32 workspace for their partials."""

    rows: int
    whole: int
    splits: int
    per_split: int
    ws_numel: int


def many_rows_tile(m: int) -> int:
    """Rows per block of q4_many_rows for m rows."""
    return 64 if m <= 64 else 128 if m <= 128 else 256


def many_rows_splits(tiles: int, sms: int) -> tuple[int, int]:
    """(whole, splits) for q4_many_rows: tiles from `whole` on are split in `splits` along k. A grid of at most half
    as many tiles as SMs is split throughout into about one block per SM; a larger one whose last wave would be
    at most half full has just those last tiles split, into as many parts as fill that wave (8192x28672 at
    m = 512: 448 tiles, the last 52 in two)."""
    if 2 * tiles <= sms:
        return 0, sms // tiles
    tail = tiles % sms
    if tiles > sms and 0 < 2 * tail <= sms:
        return tiles - tail, sms // tail
    return tiles, 1


def wgmma_x_index(xidx: torch.Tensor) -> torch.Tensor:
    """Slot order -> wgmma's k order (gptq_wgmma.cuh): entry 64c + 16j + k is xidx[64c + 16((k % 8) // 2) + 4j +
    k % 2 + 2(k // 8)], the slot q4mma's k-tile j puts at the mma's k, so that x's 16 columns of a k-step lie
    together in shared memory. xidx: [chunks * 64] (slot -> input row, -1 for pad slots)."""
    k = torch.arange(16, device=xidx.device)
    j = torch.arange(4, device=xidx.device).view(4, 1)
    slot = 16 * ((k % 8) // 2) + 4 * j + k % 2 + 2 * (k // 8)  # [j, k]
    return xidx.view(-1, 64)[:, slot.reshape(-1)].reshape(-1).contiguous()


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pairs(q: torch.Tensor) -> torch.Tensor:
    """Values [slots, N] -> [tile, chunk, g, t, 16 pairs, (lo, hi)] int64 in gptq_mma.cu's fragment order: pair
    4j + h of lane (g, t) is slots s + 2 * (h // 2) + (0, 1) of column g + 8 * (h % 2), s = 16t + 4j."""
    S, N = q.shape
    v = q.to(torch.int64).view(S // 64, 4, 4, 2, 2, N // 16, 2, 8)  # chunk, t, j, slot pair, lo/hi, tile, half, g
    return v.permute(5, 0, 7, 1, 2, 3, 6, 4).reshape(N // 16, S // 64, 8, 4, 16, 2)


def shuffle3(q: torch.Tensor) -> torch.Tensor:
    """3-bit values [slots, N] (slots a multiple of 256, N of 16) -> q3mma words, int32 [N/16, slots/256, 3, 32,
    4]: word i of lane (g, t) for chunk u of a quad holds pairs 5i .. 5i + 4 at bits 3f / 16 + 3f, and bit i of
    pair 15's two values at bits 15 / 31 (gptq_mma.cu, raw_pair)."""
    S, N = q.shape
    if S % 256 or N % 16:
        raise ValueError(f"q3mma needs slots % 256 == 0 and N % 16 == 0, got {S} x {N}")
    p = _pairs(q)
    f = torch.arange(5, device=q.device, dtype=torch.int64)
    words = []
    for i in range(3):
        lo, hi = p[..., 5 * i : 5 * i + 5, 0], p[..., 5 * i : 5 * i + 5, 1]
        w = ((lo << (3 * f)) + (hi << (16 + 3 * f))).sum(-1)
        w += ((p[..., 15, 0] >> i) & 1) << 15
        w += ((p[..., 15, 1] >> i) & 1) << 31
        words.append(w)
    w = torch.stack(words, -1)  # tile, chunk, g, t, word
    tiles, chunks = w.shape[:2]
    w = w.reshape(tiles, chunks // 4, 4, 32, 3).permute(0, 1, 4, 3, 2)  # tile, quad, word, lane, chunk in quad
    return _as_int32(w.contiguous())


def unshuffle3(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `shuffle3`: q3mma words -> 3-bit values [slots, N] (int32)."""
    tiles, quads = words.shape[:2]
    w = words.to(torch.int64).permute(0, 1, 4, 3, 2).reshape(tiles, quads * 4, 8, 4, 3) & 0xFFFFFFFF
    pairs = torch.empty(*w.shape[:4], 16, 2, dtype=torch.int64, device=words.device)
    for i in range(3):
        for f in range(5):
            pairs[..., 5 * i + f, 0] = (w[..., i] >> (3 * f)) & 7
            pairs[..., 5 * i + f, 1] = (w[..., i] >> (16 + 3 * f)) & 7
    pairs[..., 15, 0] = sum(((w[..., i] >> 15) & 1) << i for i in range(3))
    pairs[..., 15, 1] = sum(((w[..., i] >> 31) & 1) << i for i in range(3))
    v = pairs.view(tiles, quads * 4, 8, 4, 4, 2, 2, 2)  # tile, chunk, g, t, j, slot pair, half, lo/hi
    v = v.permute(1, 3, 4, 5, 7, 0, 6, 2)  # chunk, t, j, slot pair, lo/hi, tile, half, g
    return v.reshape(quads * 256, tiles * 16).to(torch.int32)


class CudaQuantLinear(GPTQLinear):
    """GPTQ Linear served by gptq_mma.cu (3- and 4-bit, float16)."""

    def __init__(self, layer: LayerShape, config: QuantizeConfig, dtype: torch.dtype):
        super().__init__(layer, config, dtype)
        self._ready = False
        self.few_rows_config: dict | None = None  # benchmark override: {"SPLITS": n}
        self.many_rows_config: dict | None = None  # many rows: {"ROWS": 64 / 128 / 256, "SPLITS": n, "WHOLE": t}
        self._plans: dict = {}  # launch plans by rows (and config): few rows' tuples, ("many", ...)'s ManyRowsPlan

    def prepare(self) -> None:
        if self._ready:
            return
        bits = self.bits
        if bits not in BITS:
            raise KernelError(f"the cuda kernel serves 3- and 4-bit checkpoints, not {bits}-bit")
        dev = self.qweight.device
        K, N = self.in_features, self.out_features
        layout = sort_rows_by_group(self)
        chunks = -(-layout.slots // (64 * BATCH_CHUNKS)) * BATCH_CHUNKS  # pad chunks: weight 0, x 0
        words = torch.empty(N // 16, chunks * 32 * bits, dtype=torch.int32, device=dev)  # bits words a lane and chunk
        for n0 in range(0, N, _SHUFFLE_COLUMNS):  # a slice at a time: shuffle's int64 temporaries stay small
            n1 = min(N, n0 + _SHUFFLE_COLUMNS)
            q = torch.zeros(chunks * 64, n1 - n0, dtype=torch.int32, device=dev)
            q[: layout.slots] = unpack(layout.qweight[:, n0:n1].contiguous(), bits, 0, layout.slots)
            words[n0 // 16 : n1 // 16] = (shuffle(q) if bits == 4 else shuffle3(q)).reshape(n1 // 16 - n0 // 16, -1)
        del q
        self.qweight = torch.empty(0, dtype=torch.int32, device=dev)  # the shuffled words are the one copy
        P = layout.slots_per_group
        groups = max(self.scales.shape[0], -(-chunks * 64 // P))  # pad slots past the last group read group G..
        sz = torch.zeros(groups, N, 2, dtype=torch.float16, device=dev)
        sz[..., 1] = 1024.0  # ... whose scale is 0: weight 0
        sz[: self.scales.shape[0], :, 0] = self.scales.to(torch.float16)
        sz[: self.scales.shape[0], :, 1] += zero_points(self).to(torch.float16)  # exact: zeros are < 2**bits
        perm = layout.perm
        xidx = torch.full((chunks * 64,), -1, dtype=torch.int32, device=dev)
        xidx[: layout.slots] = perm if perm is not None else torch.arange(K, dtype=torch.int32, device=dev)
        self.register_buffer("cu_words", words, persistent=False)
        self.register_buffer("cu_sz", sz, persistent=False)
        self.register_buffer("cu_xidx", xidx, persistent=False)  # slot -> input row (-1: pad), for the gather
        wgmma = (
            dev.type == "cuda" and torch.cuda.get_device_capability(dev) == (9, 0) and K <= WGMMA_MAX_IN_FEATURES
        )  # q4_many_rows serves this layer (else dequantize + cuBLAS)
        self.register_buffer("cu_xidx_wgmma", wgmma_x_index(xidx) if wgmma else None, persistent=False)
        self.register_buffer("cu_perm", perm, persistent=False)  # None: slot == row
        order = self.input_order  # rows sorted by group at load (act_order.py): forward_gathered reads x through it
        xfrom = None
        if order is not None and perm is None and layout.slots == K:
            xfrom = torch.full((chunks * 64,), -1, dtype=torch.int32, device=dev)
            xfrom[:K] = order.to(torch.int32)
        self.register_buffer("cu_xidx_from", xfrom, persistent=False)
        self.register_buffer(
            "cu_xidx_wgmma_from", wgmma_x_index(xfrom) if wgmma and xfrom is not None else None, persistent=False
        )
        self.register_buffer("cu_counters", torch.zeros(-(-N // 64), dtype=torch.int32, device=dev), persistent=False)
        self.chunks, self.slots, self.slots_per_group = chunks, layout.slots, P
        self._identity = perm is None and chunks * 64 == K  # x can be read as it is (when aligned)
        self._ready = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, gathered=False)

    def forward_gathered(self, x: torch.Tensor) -> torch.Tensor:
        """x in the input's own order: the gather the kernel launches anyway reads it through `input_order`."""
        if not self._ready or self.cu_xidx_from is None:
            return super().forward_gathered(x)
        return self._forward(x, gathered=True)

    def _forward(self, x: torch.Tensor, gathered: bool) -> torch.Tensor:
        if not self._ready:
            raise RuntimeError("prepare() was not called on this layer (the loader calls it after loading)")
        if x.dtype != torch.float16:
            raise KernelError(f"the cuda kernel computes in float16, got {x.dtype}")
        if x.get_device() != self.cu_words.get_device():  # another device's raw pointers would fault the context
            raise KernelError(f"input on {x.device}, layer on {self.cu_words.device}")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        if m == 0:
            out = x2.new_empty(0, self.out_features)
        elif m <= FEW_ROWS_MAX_M:
            out = self.forward_few_rows(x2, gathered)
        elif self.cu_xidx_wgmma is not None and self._many_rows_wins(
            plan := self._many_rows_plan(m, x2.device), m
        ):  # one plan lookup a call, passed on
            out = self.forward_many_rows(x2, plan, gathered)
        else:
            out = (x2.index_select(-1, self.input_order) if gathered else x2) @ self.dequantize()
            if self.bias is not None:
                out += self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def forward_few_rows(self, x: torch.Tensor, gathered: bool = False) -> torch.Tensor:
        """m <= 32 rows: one call into the library, which launches the gather of x into slot order when the rows
        were sorted (act-order; `gathered`: x is in the input's own order, act_order.py) or x is not 16-byte
        aligned (into the device's shared scratch), then the tensor-core kernel."""
        M, N, device = x.shape[0], self.out_features, x.get_device()
        if x.stride(1) != 1:
            x = x.contiguous()
        direct = not gathered and self._identity and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
        xidx = self.cu_xidx_from if gathered else self.cu_xidx
        cfg = self.few_rows_config
        key = M if cfg is None else (M, tuple(sorted(cfg.items())))  # a module lives on one device
        fixed = self._plans.get(key)
        if fixed is None:
            fixed = self._plans[key] = self._few_rows_plan(M, x.device)
        splits, per_split, ws_numel = fixed
        out = torch.empty(M, N, dtype=torch.float16, device=x.device)
        with scratch_lock(x.device):
            xs = None if direct else scratch(x.device, M * self.chunks * 64, torch.float16)
            ws = split_k_workspace(x.device, ws_numel) if splits > 1 else out
            cuda_build.check(
                cuda_build.library().gb_q4_few_rows(
                    self.cu_words.data_ptr(),
                    self.cu_sz.data_ptr(),
                    x.data_ptr(),
                    x.stride(0),
                    None if direct else xidx.data_ptr(),
                    None if direct else xs.data_ptr(),
                    None if self.bias is None else self.bias.data_ptr(),
                    out.data_ptr(),
                    ws.data_ptr(),
                    self.cu_counters.data_ptr(),
                    self.bits,
                    M,
                    N,
                    self.chunks,
                    self.slots_per_group,
                    N,
                    splits,
                    per_split,
                    device,
                    _raw_stream(device),
                ),
                "q4_few_rows",
            )
        return out

    def forward_many_rows(
        self, x: torch.Tensor, plan: ManyRowsPlan | None = None, gathered: bool = False
    ) -> torch.Tensor:
        """Hopper, any rows: one call into the library, which gathers x into wgmma's k order (into the device's
        shared scratch), then launches q4_many_rows (and, when some tiles are split, the sum of their parts).
        plan: _many_rows_plan's for these rows, when the caller has it already; gathered: x is in the input's
        own order (act_order.py)."""
        M, N, device = x.shape[0], self.out_features, x.get_device()
        if x.stride(1) != 1:
            x = x.contiguous()
        plan = plan or self._many_rows_plan(M, x.device)
        out = torch.empty(M, N, dtype=torch.float16, device=x.device)
        with scratch_lock(x.device):
            xs = scratch(x.device, -(-M // plan.rows) * plan.rows * self.chunks * 64, torch.float16)
            ws = split_k_workspace(x.device, plan.ws_numel) if plan.ws_numel else out
            cuda_build.check(
                cuda_build.library().gb_q4_many_rows(
                    self.cu_words.data_ptr(),
                    self.cu_sz.data_ptr(),
                    x.data_ptr(),
                    x.stride(0),
                    self.in_features,
                    (self.cu_xidx_wgmma_from if gathered else self.cu_xidx_wgmma).data_ptr(),
                    xs.data_ptr(),
                    None if self.bias is None else self.bias.data_ptr(),
                    out.data_ptr(),
                    ws.data_ptr(),
                    self.bits,
                    M,
                    N,
                    self.chunks,
                    self.slots_per_group,
                    N,
                    plan.rows,
                    plan.whole,
                    plan.splits,
                    plan.per_split,
                    device,
                    _raw_stream(device),
                ),
                "q4_many_rows",
            )
        return out

    def _many_rows_wins(self, plan: ManyRowsPlan, M: int) -> bool:
        """Whether q4_many_rows beats dequantize + cuBLAS for M rows: everywhere except for a 4-bit narrow layer
        split 4 ways or more throughout with M > 256, whose dequantized weight is small enough for cuBLAS to use
        better (bench/many_rows.py measures it; docs/PERFORMANCE.md). Layers it cannot serve at all have no
        cu_xidx_wgmma: prepare decides that."""
        if self.many_rows_config is not None:  # a benchmark or test asks for this path
            return True
        return not (self.bits == 4 and plan.whole == 0 and plan.splits >= 4 and M > 256)

    def _many_rows_plan(self, M: int, device: torch.device) -> ManyRowsPlan:
        """Rows a block (many_rows_tile), and which tiles are split along k and how (many_rows_splits; chunks per
        split a multiple of 4). Split tiles' partials are summed by another launch, in a fixed order."""
        cfg = self.many_rows_config
        key = ("many", M) if cfg is None else ("many", M, tuple(sorted(cfg.items())))
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        cfg = cfg or {}
        rows = cfg.get("ROWS") or many_rows_tile(M)
        tiles = -(-M // rows) * -(-self.out_features // MANY_ROWS_COLS)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        whole, splits = (cfg.get("WHOLE", 0), cfg["SPLITS"]) if "SPLITS" in cfg else many_rows_splits(tiles, sms)
        per_split = -(-self.chunks // (max(1, splits) * 4)) * 4
        splits = -(-self.chunks // per_split)
        if splits == 1:
            whole = tiles
        ws_numel = (tiles - whole) * splits * rows * MANY_ROWS_COLS
        plan = self._plans[key] = ManyRowsPlan(rows, whole, splits, per_split, ws_numel)
        return plan

    def _few_rows_plan(self, M: int, device: torch.device) -> tuple[int, int, int]:
        """(splits, chunks per split, workspace floats).

        From bench/kernels.py's split sweep on the H100 (docs/PERFORMANCE.md): up to 16 rows, about 16 chunks a
        split but at least 4 blocks per SM; for 17-32 rows (four times the math per chunk) at least 4 splits and
        2 blocks per SM.
        """
        col_blocks = -(-self.out_features // 64)
        splits = (self.few_rows_config or {}).get("SPLITS")
        if splits is None:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            if M <= 16:
                splits = max(-(-self.chunks // 16), -(-4 * sms // col_blocks))
            else:
                splits = max(4, -(-2 * sms // col_blocks))
        splits = max(1, min(splits, self.chunks))
        per_split = -(-self.chunks // (splits * BATCH_CHUNKS)) * BATCH_CHUNKS  # a split is whole batches
        splits = -(-self.chunks // per_split)
        return splits, per_split, splits * M * self.out_features

    def dequantize(self) -> torch.Tensor:
        """The float16 weight [in, out], rows in input order (one launch)."""
        if not self._ready:
            raise RuntimeError("prepare() was not called on this layer")
        w = torch.empty(self.in_features, self.out_features, dtype=torch.float16, device=self.cu_words.device)
        perm = self.cu_perm.data_ptr() if self.cu_perm is not None else None
        device = w.get_device()
        cuda_build.check(
            cuda_build.library().gb_q4_dequantize(
                self.cu_words.data_ptr(),
                self.cu_sz.data_ptr(),
                perm,
                w.data_ptr(),
                self.bits,
                self.out_features,
                self.chunks,
                self.slots_per_group,
                self.slots,
                device,
                _raw_stream(device),
            ),
            "q4_dequantize",
        )
        return w


def _check_available() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        cuda_build.library()  # builds on first use: seconds
    except (cuda_build.BuildError, OSError) as exc:
        return str(exc).splitlines()[0]  # one line for `explain`; the exception has nvcc's whole output
    return None


def _check_layer(layer: LayerShape, config: QuantizeConfig) -> str | None:
    if layer.in_features % 32:
        return "input features must be a multiple of 32"
    if layer.out_features % 16:
        return "output features must be a multiple of 16 (the kernel's column tile)"
    return None


def kernel_spec() -> KernelSpec:
    return KernelSpec(
        name="mma",
        aliases=frozenset({"cuda"}),  # its name until it was told apart from exllama (CUDA too)
        description="gptq-bridge's CUDA kernel (gptq_mma.cu): 3- and 4-bit, tensor-core (mma) decode up to 32 rows, "
        "above that wgmma on Hopper, else dequantize + cuBLAS; built with nvcc on first use",
        bits=frozenset(BITS),
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16}),
        min_capability=cuda_build.MIN_CAPABILITY,
        measured_us=MEASURED_US.get("mma", {}),
        priority=8,  # where no measurement applies: below triton (10), above exllama (5)
        factory=CudaQuantLinear,
        check_available=_check_available,
        check_layer=_check_layer,
    )


@hookimpl
def gptq_register_kernels(register):
    register(kernel_spec())
