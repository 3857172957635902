"""`cpu-int4`: 4-bit GPTQ on the CPU, computed from the 4-bit weights with torch's packed-int4 matmul.

A decode step reads every weight once: `torch-dense` reads float32 (8x the checkpoint), this kernel reads the
4-bit values and a bfloat16 scale and zero per 32 rows. torch's `_weight_int4pack_mm_for_cpu` computes
`x @ ((q - 8) * s + m)` per group of 32 rows, from weights packed by `_convert_weight_to_int4pack_for_cpu`;
GPTQ's `(q - z) * s` is that with `m = (8 - z) * s`. The op is fast for bfloat16 activations only (float16 and
float32 take a scalar path, 40x slower here), so activations are rounded to bfloat16 and the result comes back
in the model's dtype: logits then sit within half-precision tolerance of the float32 reference, not 1e-4.

Layout, decided once in `prepare()`: rows sorted by group (act-order included) into blocks of 32 slots, each
block inside one group; a group whose row count is not a multiple of 32 (a partial last group, act-order
groups of uneven size) gets padding slots that read a zero. When the layout is the identity (natural order,
no padding: the usual case) the input is used as is, otherwise it is gathered into slot order per call.

Many rows at once (a prompt) would be faster as a bfloat16 matmul over weights dequantized for that call
(`DENSE_FROM_ROWS`), but its rounding differs from the op's, so it is off: every row goes through the op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import QuantizeConfig
from ..hookspecs import hookimpl
from ..packing import unpack
from ..types import KernelSpec, LayerShape
from .base import GPTQLinear
from .measured import MEASURED_US

BLOCK = 32  # rows per scale in the packed op (its smallest group size)
COMPUTE = torch.bfloat16
# From this many rows per call, dequantize and run one bfloat16 matmul (3x faster at 512 rows). None: off, because
# the two paths round differently, and a row's result must not depend on the rows beside it (a request answered
# alone and in a packed batch must agree; tests/test_openai_server.py checks it).
DENSE_FROM_ROWS: int | None = None


def slot_order(g_idx: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source row of each slot, with `len(g_idx)` for a padding slot; group of each block of BLOCK slots)."""
    rows = g_idx.long()
    order = torch.argsort(rows, stable=True)
    counts = torch.bincount(rows, minlength=groups).tolist()
    source, block_group, start = [], [], 0
    for group, count in enumerate(counts):
        blocks = -(-count // BLOCK)
        source.append(order[start : start + count])
        source.append(torch.full((blocks * BLOCK - count,), len(rows), dtype=torch.long, device=rows.device))
        block_group += [group] * blocks
        start += count
    return torch.cat(source), torch.tensor(block_group, dtype=torch.long, device=rows.device)


class PackedInt4:
    """4-bit weights in slot order, ready for the op (decode) and for dequantization (prompts)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
        """q: [slots, out] integers in [0, 16); scales, zeros: [slots // BLOCK, out], w = (q - z) * s."""
        self.slots, self.out_features = q.shape
        s, z = scales.float(), zeros.float()
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous().int(), 1)
        self.scale_zero = torch.stack([s, (8 - z) * s], dim=-1).to(COMPUTE).contiguous()
        # what a prompt's dequantization reads (the op's own layout is private to it): two slots a byte
        self.nibbles = (q[0::2] | (q[1::2] << 4)).to(torch.uint8)

    def dense_weight(self) -> torch.Tensor:
        """[out, slots] in bfloat16."""
        sz, b = self.scale_zero, self.nibbles
        q = torch.stack((b & 15, b >> 4), dim=1).view(-1, BLOCK, self.out_features).to(COMPUTE)
        w = torch.addcmul(sz[:, None, :, 1], q - 8, sz[:, None, :, 0])
        return w.view(self.slots, self.out_features).t()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, slots] in bfloat16 -> [rows, out] in bfloat16."""
        if DENSE_FROM_ROWS is not None and x.shape[0] >= DENSE_FROM_ROWS:
            return F.linear(x, self.dense_weight())
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, BLOCK, self.scale_zero)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.packed, self.scale_zero, self.nibbles))


class CpuInt4Linear(GPTQLinear):
    def prepare(self) -> None:
        """The layout above, held as buffers (what the model holds is what memory accounting counts). On the
        meta device (`gptq-bridge info`: sizes only) the natural-order layout's shapes."""
        groups, n_in, n_out = self.scales.shape[0], self.in_features, self.out_features
        meta = self.qweight.is_meta
        source, block_group = slot_order(self.default_g_idx(torch.device("cpu")) if meta else self.g_idx, groups)
        if meta:
            slots, blocks = source.numel(), block_group.numel()
            self.weights = None
            packed = torch.empty(n_out, slots // 2, dtype=torch.uint8, device="meta")
            scale_zero = torch.empty(blocks, n_out, 2, dtype=COMPUTE, device="meta")
            nibbles = torch.empty(slots // 2, n_out, dtype=torch.uint8, device="meta")
        else:
            q = unpack(self.qweight, 4, 0, n_in)  # [in, out]
            q = torch.cat([q, q.new_zeros(1, n_out)])[source]  # slot order; padding slots read 0
            zeros = unpack(self.qzeros, 4, 1, n_out) + self.zero_offset
            self.weights = PackedInt4(q, self.scales[block_group], zeros[block_group])
            packed, scale_zero, nibbles = self.weights.packed, self.weights.scale_zero, self.weights.nibbles
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scale_zero", scale_zero, persistent=False)
        self.register_buffer("nibbles", nibbles, persistent=False)
        identity = source.numel() == n_in and torch.equal(source, torch.arange(n_in, device=source.device))
        self.register_buffer("source", None if identity else source, persistent=False)
        self.qweight = self.qzeros = None  # replaced by the layout above: keep the memory at the 4-bit size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(COMPUTE)
        if self.source is not None:
            x2 = F.pad(x2, (0, 1)).index_select(-1, self.source)
        out = self.weights.matmul(x2).to(x.dtype).view(*shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out


def _check_layer(layer: LayerShape, config: QuantizeConfig) -> str | None:
    if layer.in_features % 32:
        return "input features must be a multiple of 32 (GPTQ packs 32 rows at a time)"
    if layer.out_features % 16:
        return "output features must be a multiple of 16 (the packed int4 op's tile)"
    return None


def _check_available() -> str | None:
    ops = torch.ops.aten
    if not (hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")):
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu (needs torch >= 2.5)"
    return None


CPU_INT4_KERNEL = KernelSpec(
    name="cpu-int4",
    description="CPU, computed from the 4-bit weights (torch's packed int4 matmul, bfloat16 activations)",
    bits=frozenset({4}),
    devices=frozenset({"cpu"}),
    measured_us=MEASURED_US["cpu-int4"],
    measured_on="cpu",
    priority=2,
    factory=CpuInt4Linear,
    check_layer=_check_layer,
    check_available=_check_available,
)


@hookimpl
def gptq_register_kernels(register):
    register(CPU_INT4_KERNEL)
