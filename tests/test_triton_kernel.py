"""The Triton kernels, run by triton's interpreter on the CPU, against the reference (torch) kernel.

TRITON_INTERPRET=1 must be set before triton wraps a kernel; the kernel module jits lazily, but set it before
anything imports triton all the same. Shapes stay tiny: the interpreter runs each program in numpy.
Widths: in = 160 (group 128 leaves a partial group of 32), out = 48 (not a multiple of the column tile).
"""

import itertools
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")

from tiny_checkpoints import build, relative_error  # noqa: E402

import gptq_bridge  # noqa: E402
from gptq_bridge.config import QuantizeConfig  # noqa: E402
from gptq_bridge.kernels import triton_gptq  # noqa: E402
from gptq_bridge.kernels.torch_ref import TorchQuantLinear  # noqa: E402
from gptq_bridge.kernels.triton_gptq import TritonQuantLinear  # noqa: E402
from gptq_bridge.quantize.gptq_layer import IntLayer, pack_layer, rtn_quantize  # noqa: E402
from gptq_bridge.types import LayerShape  # noqa: E402

K, N = 160, 48


def make_pair(
    bits,
    group_size,
    desc_act,
    fmt,
    sym,
    *,
    k=K,
    n=N,
    dtype=torch.float32,
    bias=False,
    seed=0,
    int_layer: IntLayer | None = None,
):
    """The same on-disk tensors in a triton module and a torch (reference) module, both prepared."""
    gen = torch.Generator().manual_seed(seed)
    if int_layer is None:
        weight = torch.randn(n, k, generator=gen)
        order = torch.randperm(k, generator=gen) if desc_act else None
        int_layer = rtn_quantize(weight, bits, group_size, sym=sym, order=order, min_zero=1 if fmt == "gptq" else 0)
    tensors = pack_layer(int_layer, bits, fmt)
    if bias:
        tensors["bias"] = torch.randn(n, generator=gen)
    config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, checkpoint_format=fmt)
    shape = LayerShape(name="layer", in_features=k, out_features=n, bias=bias)
    modules = []
    for cls in (TritonQuantLinear, TorchQuantLinear):
        module = cls(shape, config, dtype)
        for key, value in tensors.items():
            setattr(module, key, value.to(dtype) if value.is_floating_point() else value.clone())
        module.fill_missing()
        module.prepare()
        modules.append(module)
    return modules


def x_rows(m, k=K, dtype=torch.float32, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


COMBOS = list(itertools.product([2, 3, 4, 8], [-1, 32, 128], [False, True], ["gptq", "gptq_v2"], [True, False]))


@pytest.mark.parametrize(
    "bits,group_size,desc_act,fmt,sym",
    COMBOS,
    ids=[f"{b}bit-g{g}-{'act' if a else 'noact'}-{f}-{'sym' if s else 'asym'}" for b, g, a, f, s in COMBOS],
)
def test_every_setting_matches_reference(bits, group_size, desc_act, fmt, sym):
    k = K if group_size == 128 else 96  # 160 = 128 + a partial group of 32; 96 keeps the interpreter quick
    tri, ref = make_pair(bits, group_size, desc_act, fmt, sym, k=k, seed=bits * 31 + group_size)
    if desc_act and group_size != -1:
        assert tri.tq_perm is not None  # rows really were sorted by group
    with torch.no_grad():
        x = x_rows(3, k=k, seed=bits)
        assert relative_error(tri.forward_decode(x), ref(x)) < 1e-5
        x = x_rows(20, k=k, seed=bits + 1)
        want = ref(x)
        assert relative_error(tri.forward_gemm(x), want) < 1e-5
        assert relative_error(x @ tri.dequantize(torch.float32), want) < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_single_row_and_forward_dispatch(bits):
    """m = 1 (the decode case), through forward() with a 3-D input, bias included."""
    tri, ref = make_pair(bits, 32, True, "gptq", False, bias=True, seed=bits)
    with torch.no_grad():
        for shape in ((1, 1, K), (2, 1, K), (2, 8, K)):  # decode (1, 2 rows) and gemm (16 rows)
            x = torch.randn(*shape)
            got = tri(x)
            assert got.shape == (*shape[:-1], N)
            assert relative_error(got, ref(x)) < 1e-5


def test_irregular_groups_are_padded():
    """g_idx with uneven group sizes and a group size that is no multiple of 32 (48): pad slots add nothing."""
    gen = torch.Generator().manual_seed(5)
    bits, groups = 4, 5
    g_idx = torch.randint(0, groups, (K,), generator=gen).to(torch.int32)
    g_idx[:groups] = torch.arange(groups, dtype=torch.int32)  # every group used
    layer = IntLayer(
        q=torch.randint(0, 16, (K, N), generator=gen),
        zeros=torch.randint(0, 16, (groups, N), generator=gen),
        scales=torch.rand(groups, N, generator=gen) + 0.1,
        g_idx=g_idx,
    )
    tri, ref = make_pair(bits, 48, True, "gptq_v2", False, int_layer=layer)
    assert tri.slots % 32 == 0 and tri.slots > K  # padded
    with torch.no_grad():
        for m in (1, 5, 20):
            x = x_rows(m, seed=m)
            want = ref(x)
            assert relative_error(tri.forward_decode(x) if m <= 16 else tri.forward_gemm(x), want) < 1e-5
        assert relative_error(tri.dequantize(torch.float32), ref.weight(torch.float32)) < 1e-6


def test_split_k_counters_reset_between_calls():
    """The split-K reduction is done by the last program of a column tile, which resets its counter."""
    tri, ref = make_pair(4, 32, False, "gptq", True, n=80)
    tri.decode_config = {"SPLIT": 5, "BLOCK_N": 32}  # 5 blocks of 32 rows, one per split; 3 column tiles
    tri.gemm_config = {"SPLIT": 3, "BLOCK_K": 32}  # 5 tiles over 3 splits: the last split runs past the end
    with torch.no_grad():
        for forward, m in ((tri.forward_decode, 2), (tri.forward_gemm, 20)):
            x = x_rows(m)
            first = forward(x)
            assert int(tri.tq_counters.abs().sum()) == 0
            second = forward(x)
            assert torch.equal(first, second)
            assert relative_error(first, ref(x)) < 1e-5


def test_float16_inputs():
    tri, ref = make_pair(4, 128, True, "gptq", True, dtype=torch.float16)
    with torch.no_grad():
        for m in (1, 20):
            x = x_rows(m, dtype=torch.float16)
            got = tri.forward_decode(x) if m == 1 else tri.forward_gemm(x)
            assert got.dtype == torch.float16
            assert relative_error(got.float(), ref(x.float()).float()) < 3e-3


def test_registration_follows_the_interpreter_switch(monkeypatch):
    spec = triton_gptq.kernel_spec()
    assert spec.name == "triton" and "cpu" in spec.devices and spec.bits == frozenset({2, 3, 4, 8})
    assert spec.check_available() is None
    assert spec.priority < 0  # "auto" never picks the (slow) interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    spec = triton_gptq.kernel_spec()
    assert spec.devices == frozenset({"cuda"}) and spec.priority > 0  # measured faster than torch
    if not torch.cuda.is_available():
        assert "TRITON_INTERPRET" in spec.check_available()


def test_layer_not_prepared_is_an_error():
    config = QuantizeConfig(bits=4, group_size=32)
    module = TritonQuantLinear(LayerShape(name="l", in_features=64, out_features=32), config, torch.float32)
    with pytest.raises(RuntimeError, match="prepare"):
        module.forward_decode(torch.zeros(1, 64))


@pytest.mark.parametrize(
    "bits,group_size,desc_act,sym,fmt", [(4, 32, True, True, "gptq"), (3, 128, True, False, "gptq_v2")]
)
def test_whole_model_matches_torch_kernel(tmp_path, bits, group_size, desc_act, sym, fmt):
    ck = build(
        tmp_path / "ck", bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, checkpoint_format=fmt, seed=3
    )
    tri = gptq_bridge.load_model(str(ck.path), kernel="triton", device="cpu")
    ref = gptq_bridge.load_model(str(ck.path), kernel="torch", device="cpu")
    assert tri.kernel == "triton"
    assert isinstance(tri.model.model.layers[0].mlp.down_proj, TritonQuantLinear)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for batch in (ids[:, :1], ids):  # 2 rows per Linear (decode kernel), then 20 (gemm kernel)
            got, want = tri.model(batch).logits, ref.model(batch).logits
            assert relative_error(got, want) < 1e-5
            assert relative_error(got, ck.reference(batch).logits) < 1e-4
