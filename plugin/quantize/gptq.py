"""GPTQ for one Linear layer: quantize its weight so the layer's *output* on calibration data changes least.

GPTQ (Frantar et al., 2022) quantizes the input columns of W one at a time and spreads each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X / n of the layer's
inputs. What this module adds around that core, and why:

- the Hessian is summed in float64 over any number of batches (`Hessian`), so many small batches give the
  same answer as one large one;
- damping (a fraction of the mean diagonal) grows automatically until the Cholesky factorisation succeeds;
- act-order walks columns by descending Hessian diagonal; groups follow that walk (non-monotonic `g_idx`)
  unless `static_groups` fixes them up front in the original order;
- G = ceil(in / g) groups, the last one possibly partial; lazy block updates (block of 128 columns) keep the
  big rank-B update a matrix multiply; blocks are aligned to group boundaries so every group's parameters are
  computed from fully updated weights;
- each group's scale and zero come from a grid search over shrink factors of the min/max range (clipping),
  minimising the Hessian-weighted rounding error: outliers are clipped when that costs less than the
  coarser grid they would force on everyone else. This matters most at 3 bits.

The result is an `IntLayer`, which `gptq_layer.pack_layer` turns into AutoGPTQ's tensors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import GPTQBridgeError
from .gptq_layer import IntLayer, group_index

# Shrink factors tried for each group's range: a coarse pass, then a finer one around the best coarse value.
COARSE_SHRINK = tuple(1.0 - 0.05 * k for k in range(11))  # 1.0 ... 0.5
FINE_STEP = 0.01
FINE_OFFSETS = (-2, -1, 1, 2)  # x FINE_STEP around the best coarse factor
SMALLEST_SCALE = 2.0**-24  # smallest positive float16; scales are stored as float16


def _column_edges(columns: int) -> list[int]:
    """Column blocks for the upper-triangle products: at least 256 wide, at most 8 of them."""
    width = max(256, -(-columns // 8))
    return list(range(0, columns, width)) + [columns]


class Hessian:
    """Running H = 2/n * sum(x^T x) over calibration batches, accumulated in float64.

    x^T x is symmetric, so only its upper triangle is computed, in blocks of columns (block row i times the
    columns from block i on): about 60-70% of the full product's arithmetic. `sum` holds that upper triangle
    (plus whatever symmetric matrix is added to it directly); `matrix()` mirrors it.
    """

    def __init__(self, columns: int, device: torch.device | str | None = None, rows_per_step: int = 8192):
        self.columns = columns
        self.sum = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.count = 0
        self.rows_per_step = rows_per_step
        self._edges = _column_edges(columns)

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs [..., columns] (any float dtype)."""
        if x.shape[-1] != self.columns:
            raise ValueError(f"Hessian expects inputs with {self.columns} features, got shape {list(x.shape)}")
        x = x.detach().reshape(-1, self.columns)
        edges = self._edges
        for start in range(0, x.shape[0], self.rows_per_step):
            part = x[start : start + self.rows_per_step].to(device=self.sum.device, dtype=torch.float32)
            for a, b in zip(edges[:-1], edges[1:]):
                self.sum[a:b, a:] += (part[:, a:b].t() @ part[:, a:]).to(torch.float64)
        self.count += x.shape[0]

    def matrix(self, consume: bool = False) -> torch.Tensor:
        """H in float64. Mirrored in place, block by block, so this needs no float64 [in, in] matrix beyond
        the result (4096 wide: 128 MB each; 28672, Llama-2-70B's down_proj: 6.6 GB each). With `consume` the
        running sum itself becomes the result and this Hessian can take no more batches."""
        if self.count == 0:
            raise ValueError("no calibration inputs were added to this Hessian")
        if self.sum is None:
            raise ValueError("this Hessian's matrix was already taken (matrix(consume=True))")
        m = self.sum if consume else self.sum.clone()
        if consume:
            self.sum = None
        edges = self._edges
        for a, b in zip(edges[:-1], edges[1:]):
            diagonal = m[a:b, a:b]
            diagonal.copy_(diagonal.triu() + diagonal.triu(1).t())
            m[b:, a:b] = m[a:b, b:].t()
        return m.mul_(2.0 / self.count)


class CrossMoment:
    """Running 2/n * sum(x^T t) over calibration batches (x [..., columns], t [..., outputs]), in float64.

    The statistic that fits a layer to targets other than its own outputs (`quantize`'s fp_targets).
    """

    def __init__(self, columns: int, outputs: int, device: torch.device | str | None = None, rows_per_step: int = 8192):
        self.columns, self.outputs = columns, outputs
        self.device = device
        self.sum: torch.Tensor | None = None  # allocated by the first batch (a block's later steps wait)
        self.count = 0
        self.rows_per_step = rows_per_step

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.columns)
        t = t.detach().reshape(-1, self.outputs)
        if x.shape[0] != t.shape[0]:
            raise ValueError(f"CrossMoment: {x.shape[0]} input rows but {t.shape[0]} target rows")
        if self.sum is None:
            if self.count:
                raise ValueError("this statistic's matrix was already taken (matrix(consume=True))")
            self.sum = torch.zeros(self.columns, self.outputs, dtype=torch.float64, device=self.device)
        for start in range(0, x.shape[0], self.rows_per_step):
            xs = x[start : start + self.rows_per_step].to(device=self.sum.device, dtype=torch.float32)
            ts = t[start : start + self.rows_per_step].to(device=self.sum.device, dtype=torch.float32)
            self.sum += (xs.t() @ ts).to(torch.float64)
        self.count += x.shape[0]

    def matrix(self, consume: bool = False) -> torch.Tensor:
        """The statistic in float64; with `consume`, scaled in place (no second copy) and then gone from here."""
        if self.count == 0:
            raise ValueError("no calibration inputs were added to this statistic")
        if self.sum is None:
            raise ValueError("this statistic's matrix was already taken (matrix(consume=True))")
        if not consume:
            return self.sum * (2.0 / self.count)
        m, self.sum = self.sum, None
        return m.mul_(2.0 / self.count)


@contextlib.contextmanager
def one_thread():
    """Run on one intra-op thread. GPTQ's column loop is thousands of small ops; on a CPU each one that
    enters a parallel region pays for a thread barrier, and on a busy machine (more runnable threads than
    cores) those barriers cost milliseconds. One thread runs the loop 5-20x faster there; its few large
    matrix multiplies lose little."""
    if torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class GPTQResult:
    layer: IntLayer
    damp: float  # the damping fraction that made H factorisable (>= the one asked for)
    loss: float  # GPTQ's own measure: sum over columns of squared error / inverse-Hessian diagonal
    dead_columns: int  # inputs that were always zero in calibration (their weights are set to zero)


def inverse_hessian_factor(
    hessian: torch.Tensor, damp: float, max_damp: float = 1.0, where: str = "layer"
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, increasing damp until it exists.

    Computed in float64: with float32 here (what other GPTQ implementations use) end-to-end perplexities
    moved by up to 2% between runs that differ only in this rounding (SmolLM2 4-bit g32: 26.40 vs 26.86).
    """
    return _factor_reversed(hessian.to(torch.float64).flip(0, 1), damp, max_damp, where)


def _factor_reversed(h: torch.Tensor, damp: float, max_damp: float, where: str) -> tuple[torch.Tensor, float]:
    """`inverse_hessian_factor` of H, given h = J H J (J: order reversal) in float64, which it overwrites.

    With J (H + damp) J = L L^T: (H + damp)^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular:
    the factor wanted, from one Cholesky and one triangular inverse. Two float64 [in, in] matrices at most,
    h and L (each is 6.6 GB for Llama-2-70B's down_proj): damping is added to h's diagonal in place (restored
    from a copy of the diagonal for the next try) and L^-1 is solved into h's own memory.
    """
    if not bool(torch.isfinite(h.sum())):  # an inf or NaN anywhere makes the sum non-finite
        raise GPTQBridgeError(
            f"{where}: the Hessian of the calibration inputs has inf/NaN entries "
            "(activations overflowed; quantize from float32 or bfloat16 weights)"
        )
    diagonal = h.diagonal().clone()
    mean_diag = float(diagonal.flip(0).mean())  # summed in H's own order, as it always was
    if mean_diag <= 0:
        mean_diag = 1.0
    d = damp
    while d <= max_damp:
        torch.add(diagonal, d * mean_diag, out=h.diagonal())
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            # L comes column-major from LAPACK; solving into h's transpose (column-major too) needs no copy
            inverse = h.t()
            inverse.zero_().diagonal().fill_(1.0)
            torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)
            del lower
            upper = inverse.to(torch.float32)
            if not bool(torch.isfinite(upper).all()):  # h is spent, so no retry with more damping
                raise GPTQBridgeError(
                    f"{where}: the inverse Hessian factor overflows float32 with damp_percent {d:g}; raise damp_percent"
                )
            return upper.flip(0, 1), d
        del lower
        d *= 2
    raise GPTQBridgeError(
        f"{where}: the Hessian is not positive definite even with damp_percent {d / 2:g} "
        "(the calibration inputs may be degenerate; try more or other calibration text)"
    )


def _range_params(lo: torch.Tensor, hi: torch.Tensor, maxq: int, sym: bool, min_zero: int):
    """Scale (rounded to float16, as stored) and integer zero point for ranges [lo, hi] (lo <= 0 <= hi)."""
    if sym:
        hi = torch.maximum(hi, -lo)
        scale = 2 * hi / maxq
    else:
        scale = (hi - lo) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).clamp(min=SMALLEST_SCALE)
    scale = scale.to(torch.float16).to(torch.float32)
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-lo / scale).clamp(min_zero, maxq)
    return scale, zero


def _group_error(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, col_weight: torch.Tensor
) -> torch.Tensor:
    """Weighted squared rounding error per output row; w [out, n], scale/zero [out, 1]. In place, one pass."""
    x = torch.div(w, scale)
    x.round_().add_(zero).clamp_(0, maxq).sub_(zero).mul_(scale).sub_(w)
    x.square_()
    return x @ col_weight


def find_params(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    *,
    min_zero: int = 0,
    col_weight: torch.Tensor | None = None,
    clip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per output row for the group w [out, n].

    With `clip`, the min/max range is shrunk by the factor (searched per row) that minimises the
    `col_weight`-weighted squared error; factor 1.0 (plain min/max) is always a candidate, so the search
    can only help on the measure it optimises.
    """
    maxq = 2**bits - 1
    lo = w.min(1).values.clamp(max=0)
    hi = w.max(1).values.clamp(min=0)
    scale, zero = _range_params(lo, hi, maxq, sym, min_zero)
    if not clip:
        return scale, zero
    cw = torch.ones(w.shape[1], dtype=w.dtype, device=w.device) if col_weight is None else col_weight.to(w.dtype)

    best_err = _group_error(w, scale.unsqueeze(-1), zero.unsqueeze(-1), maxq, cw)
    best_f = torch.ones_like(lo)

    def consider(f: torch.Tensor) -> None:  # f: one shrink factor per row, [out]
        nonlocal best_err, best_f, scale, zero
        s, z = _range_params(lo * f, hi * f, maxq, sym, min_zero)
        err = _group_error(w, s.unsqueeze(-1), z.unsqueeze(-1), maxq, cw)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_f = torch.where(better, f, best_f)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)

    for factor in COARSE_SHRINK[1:]:
        consider(torch.full_like(lo, factor))
    center = best_f.clone()
    for k in FINE_OFFSETS:  # refine around each row's best coarse factor
        consider((center + k * FINE_STEP).clamp(0.05, 1.0))
    return scale, zero


@dataclass
class PreparedHessian:
    """What GPTQ needs from a Hessian, computed once and shared by the layers that read the same input."""

    desc_act: bool
    perm: torch.Tensor  # column walk order (descending diagonal with act-order)
    invperm: torch.Tensor
    upper: torch.Tensor  # upper Cholesky factor of the damped inverse Hessian, in walk order, float32
    damp: float
    dead: torch.Tensor  # bool [in]: inputs that were always zero
    hessian: torch.Tensor  # H itself, original order, float32 (for the scale refit)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.upper.shape)

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """(H + damp)^-1 rhs for rhs [in, k] in the original column order, through the stored factor."""
        U = self.upper.to(rhs.device)
        walk = rhs.to(torch.float32)[self.perm.to(rhs.device)]
        return (U.t() @ (U @ walk))[self.invperm.to(rhs.device)]


def prepare_hessian(
    hessian: torch.Tensor | Hessian, *, desc_act: bool, damp_percent: float, where: str = "layer"
) -> PreparedHessian:
    """Dead inputs, act-order permutation and the damped inverse factor of H.

    Given a `Hessian` (rather than its matrix), its running sum is consumed: the float64 matrix is then made
    in the sum's own memory, and at most two float64 [in, in] matrices exist at any time.
    """
    if isinstance(hessian, Hessian):
        H = hessian.matrix(consume=True)
    else:
        H = hessian.detach().to(torch.float64).clone()
    del hessian
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    original = H.to(torch.float32)
    if desc_act:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    else:
        perm = torch.arange(H.shape[0], device=H.device)
    # the factorisation wants the walk order reversed: permute straight into that order, one copy at a time
    reverse = perm.flip(0)
    H = H.index_select(0, reverse)
    H = H.index_select(1, reverse)
    U, damp = _factor_reversed(H, damp_percent, 1.0, where)
    return PreparedHessian(
        desc_act=desc_act, perm=perm, invperm=torch.argsort(perm), upper=U, damp=damp, dead=dead, hessian=original
    )


def _block_size(block_size: int, group_size: int) -> int:
    """A lazy-update block size such that every group starts at a block start or lies inside one block.

    Then each group's scale search sees weights that have received every update from earlier columns.
    """
    if group_size <= block_size:
        return (block_size // group_size) * group_size
    for b in range(block_size, 0, -1):  # the largest divisor of the group size not above block_size
        if group_size % b == 0:
            return b
    return 1


def refit_scales(layer: IntLayer, weight: torch.Tensor, hessian: torch.Tensor) -> IntLayer:
    """Least-squares scales for fixed integers: minimise (W_q - W) H (W_q - W)^T row by row.

    GPTQ chooses each group's scale before it rounds and compensates the group's columns, so once the
    integers are fixed a better scale usually exists. For output row o, W_q[o] = sum_g s[g, o] v_g (v_g: the
    row's (q - z) on group g's inputs), so the best scales solve a G x G system per row:
    A[g, g'] = v_g^T H v_g',  b[g] = v_g^T H w. A scale that comes out non-positive or non-finite keeps its
    old value; the result is kept only where it lowers that row's error.
    """
    device = weight.device
    g_idx = layer.g_idx.to(device).long()
    groups = layer.scales.shape[0]
    H = hessian.to(device=device, dtype=torch.float32)
    V = (layer.q.to(device) - layer.zeros.to(device)[g_idx]).to(torch.float32).t().contiguous()  # [out, in]
    W = weight.to(torch.float32)
    out_features = W.shape[0]
    b = torch.zeros(out_features, groups, device=device).index_add_(1, g_idx, V * (W @ H))
    A = torch.empty(out_features, groups, groups, device=device)
    for g in range(groups):
        cols = torch.nonzero(g_idx == g).flatten()
        T = V[:, cols] @ H[cols, :]  # [out, in]: row o of (v_g H)
        A[:, :, g] = torch.zeros(out_features, groups, device=device).index_add_(1, g_idx, V * T)
    ridge = 1e-6 * A.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)
    A.diagonal(dim1=1, dim2=2).add_(ridge.unsqueeze(-1))
    old = layer.scales.to(device=device, dtype=torch.float32).to(torch.float16).to(torch.float32).t()  # [out, G]
    new = torch.linalg.solve(A, b)
    new = torch.where(torch.isfinite(new) & (new > SMALLEST_SCALE), new, old).clamp(max=65504.0)
    new = new.to(torch.float16).to(torch.float32)

    def row_error(s):  # (W_q - W) H (W_q - W)^T per row, less the constant w H w^T: s A s - 2 s b
        return torch.einsum("og,ogh,oh->o", s, A, s) - 2 * (s * b).sum(1)

    keep = row_error(new) < row_error(old)
    scales = torch.where(keep.unsqueeze(-1), new, old).t().contiguous()
    return IntLayer(q=layer.q, zeros=layer.zeros, scales=scales.to(layer.scales.device), g_idx=layer.g_idx)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | PreparedHessian,
    *,
    bits: int,
    group_size: int = -1,
    sym: bool = True,
    desc_act: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 32,
    clip: bool = True,
    refit: bool = True,
    min_zero: int = 0,
    where: str = "layer",
) -> GPTQResult:
    """Quantize an nn.Linear weight [out, in] given the Hessian [in, in] of its inputs (or its prepared form).

    `min_zero` = 1 keeps asymmetric zero points storable in v1 ("gptq") checkpoints, which store z - 1.
    On the CPU this runs on one thread (see `one_thread`).
    """
    if weight.device.type == "cpu":
        with one_thread():
            return _gptq_quantize(
                weight,
                hessian,
                bits=bits,
                group_size=group_size,
                sym=sym,
                desc_act=desc_act,
                static_groups=static_groups,
                damp_percent=damp_percent,
                block_size=block_size,
                clip=clip,
                refit=refit,
                min_zero=min_zero,
                where=where,
            )
    return _gptq_quantize(
        weight,
        hessian,
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
        static_groups=static_groups,
        damp_percent=damp_percent,
        block_size=block_size,
        clip=clip,
        refit=refit,
        min_zero=min_zero,
        where=where,
    )


def _gptq_quantize(
    weight,
    hessian,
    *,
    bits,
    group_size,
    sym,
    desc_act,
    static_groups,
    damp_percent,
    block_size,
    clip,
    refit,
    min_zero,
    where,
) -> GPTQResult:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, not {bits}")
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"Hessian shape {list(hessian.shape)} does not match weight shape {list(weight.shape)}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be -1 or positive, not {group_size}")
    maxq = 2**bits - 1
    device = weight.device
    if not isinstance(hessian, PreparedHessian):
        hessian = prepare_hessian(hessian, desc_act=desc_act, damp_percent=damp_percent, where=where)
    elif hessian.desc_act != desc_act:
        raise ValueError("the prepared Hessian was made for a different desc_act setting")
    prepared = hessian
    perm, invperm, U = prepared.perm.to(device), prepared.invperm.to(device), prepared.upper.to(device)
    W = weight.detach().to(torch.float32).clone()
    W[:, prepared.dead.to(device)] = 0.0
    W = W[:, perm]
    col_weight = 1.0 / U.diagonal() ** 2  # how much each column's squared rounding error costs (walk order)

    gs = in_features if group_size == -1 else group_size
    groups = -(-in_features // gs)
    dynamic = group_size != -1 and not static_groups
    g_idx = group_index(in_features, gs, perm.cpu() if dynamic else None)
    scales = torch.empty(groups, out_features, device=device)
    zeros = torch.empty(groups, out_features, device=device)
    if not dynamic:
        # groups fixed in the original row order, from the weights before any GPTQ update
        W_orig = W[:, invperm]
        cw_orig = col_weight[invperm]
        for g in range(groups):
            cols = slice(g * gs, min((g + 1) * gs, in_features))
            scales[g], zeros[g] = find_params(
                W_orig[:, cols], bits, sym, min_zero=min_zero, col_weight=cw_orig[cols], clip=clip
            )
        del W_orig
        col_group = g_idx.to(device).long()[perm]  # group of each column in walk order
    block = _block_size(block_size, gs) if dynamic else block_size

    # Work on W^T [in, out]: each column of W is then a contiguous row, and the per-column update of the
    # rest of the block is a contiguous rank-1 update.
    Wt = W.t().contiguous()
    del W
    Q = torch.empty(in_features, out_features, dtype=torch.float32, device=device)
    loss = torch.zeros(out_features, dtype=torch.float32, device=device)
    s = z = None
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        W1 = Wt[i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic:
                if j % gs == 0:
                    g = j // gs
                    end = min(j + gs, in_features)
                    # at a block start Wt is current (all earlier blocks applied); inside a block, W1 is
                    cols = Wt[j:end] if i == 0 else W1[i : i + end - j]
                    scales[g], zeros[g] = find_params(
                        cols.t(), bits, sym, min_zero=min_zero, col_weight=col_weight[j:end], clip=clip
                    )
                    s, z = scales[g], zeros[g]
            else:
                g = int(col_group[j])
                s, z = scales[g], zeros[g]
            w = W1[i]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            err = (w - (q - z) * s) / U1[i, i]
            Q[j] = q
            Err1[i] = err
            loss.addcmul_(err, err)
            if i + 1 < i2 - i1:
                W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1.0)
        if i2 < in_features:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)

    layer = IntLayer(q=Q[invperm].to(torch.int64), zeros=zeros.to(torch.int64), scales=scales, g_idx=g_idx.to(device))
    if refit:
        w0 = weight.detach().to(torch.float32)
        w0 = w0.masked_fill(prepared.dead.to(device).unsqueeze(0), 0.0)
        layer = refit_scales(layer, w0, prepared.hessian)
    layer = IntLayer(q=layer.q.cpu(), zeros=layer.zeros.cpu(), scales=layer.scales.cpu(), g_idx=layer.g_idx.cpu())
    return GPTQResult(
        layer=layer, damp=prepared.damp, loss=float(loss.double().sum()), dead_columns=int(prepared.dead.sum())
    )
