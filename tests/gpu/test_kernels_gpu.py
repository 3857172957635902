"""Every GPU kernel against the reference on the device: `python -m pytest -m gpu tests/gpu` on a CUDA machine.

Inputs are drawn fresh each run (seeded from the clock, printed on failure), never zeros. The reference is
float32: x @ the dequantized weight computed by the torch kernel's own unpacking.
"""

import itertools
import os
import time

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 is set: these tests run the compiled kernels", allow_module_level=True)
pytest.importorskip("triton")

import gptq_bridge  # noqa: E402
from gptq_bridge.config import QuantizeConfig  # noqa: E402
from gptq_bridge.errors import KernelError  # noqa: E402
from gptq_bridge.kernels import exllama  # noqa: E402
from gptq_bridge.kernels.torch_ref import TorchQuantLinear  # noqa: E402
from gptq_bridge.kernels.triton_gptq import TritonQuantLinear  # noqa: E402
from gptq_bridge.quantize.gptq_layer import IntLayer, group_index, pack_layer  # noqa: E402

HAVE_EXLLAMA = exllama.kernel_spec().check_available() is None
from gptq_bridge.types import LayerShape  # noqa: E402

SEED = int(os.environ.get("GPU_TEST_SEED", time.time_ns() % 2**31))
DEV = torch.device("cuda")

LLAMA2_7B = [(4096, 4096), (4096, 11008), (11008, 4096)]
LLAMA2_70B = [(8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192)]


def relative_error(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_layer(k, n, bits, group_size, act_order, sym, gen) -> IntLayer:
    """A random quantized layer drawn on the GPU (rtn on 70B-sized matrices would take minutes on a CPU)."""
    g = group_size if group_size != -1 else k
    order = torch.randperm(k, generator=gen, device=DEV) if act_order else None
    g_idx = group_index(k, group_size, order.cpu() if order is not None else None).to(DEV)
    groups = -(-k // g)
    maxq = 2**bits - 1
    q = torch.randint(0, maxq + 1, (k, n), generator=gen, device=DEV)
    if sym:
        zeros = torch.full((groups, n), (maxq + 1) // 2, device=DEV)
    else:
        zeros = torch.randint(1, maxq + 1, (groups, n), generator=gen, device=DEV)
    scales = torch.rand(groups, n, generator=gen, device=DEV) * 0.02 + 0.002
    return IntLayer(q=q, zeros=zeros, scales=scales, g_idx=g_idx)


def make_modules(
    k, n, bits, group_size=128, act_order=True, sym=False, fmt="gptq", seed=0, kernel=TritonQuantLinear, device=DEV
):
    """(`kernel` module prepared on `device`, float32 reference weight [in, out] there, generator on DEV) for a
    fresh random layer."""
    gen = torch.Generator(device=DEV).manual_seed(SEED + seed)
    layer = random_layer(k, n, bits, group_size, act_order, sym, gen)
    tensors = pack_layer(layer, bits, fmt)
    config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=act_order, sym=sym, checkpoint_format=fmt)
    shape = LayerShape(name="layer", in_features=k, out_features=n)
    ref = TorchQuantLinear(shape, config, torch.float16)
    for key, value in tensors.items():
        setattr(ref, key, value.to(torch.float16) if value.is_floating_point() else value)
    ref.fill_missing()
    weight = ref.weight(torch.float32)  # [in, out], before the kernel's module may change its on-disk copy
    module = kernel(shape, config, torch.float16)
    for key, value in tensors.items():
        setattr(module, key, (value.to(torch.float16) if value.is_floating_point() else value.clone()).to(device))
    module.fill_missing()
    module.prepare()
    return module, weight.to(device), gen


def check_paths(tri, weight, gen, ms):
    for m in ms:
        x = torch.randn(m, tri.in_features, generator=gen, device=DEV).half()
        want = x.float() @ weight
        paths = {"gemm": tri.forward_gemm, "dequant": tri.forward_dequant, "forward": tri.forward}
        if m <= 16:
            paths["decode"] = tri.forward_decode
        for name, fn in paths.items():
            got = fn(x)
            assert got.shape == (m, tri.out_features) and got.dtype == torch.float16
            assert not torch.isnan(got).any(), f"{name} m={m}: NaN (seed {SEED})"
            err = relative_error(got, want)
            assert err < 2e-3, f"{name} m={m}: relative error {err:.2e} (seed {SEED})"
            # the second call launches the plan's compiled kernel directly (the first went through triton's jit)
            assert torch.equal(fn(x), got), f"{name} m={m}: the direct launch differs (seed {SEED})"


def test_plans_follow_alignment_stride_and_dtype():
    """A plan's kernel is compiled for its inputs' alignment, row stride and the buffers' dtype: an x that is
    not 16-byte aligned, a strided x, and the module moved to float32 each get a plan of their own."""
    tri, weight, gen = make_modules(4096, 4096, 4, 128, True, seed=5)
    for m in (1, 8, 300):
        x = torch.randn(m, 4096, generator=gen, device=DEV).half()
        tri(x)  # plans for the aligned, contiguous x
        flat = torch.empty(m * 4096 + 1, dtype=torch.float16, device=DEV)
        shifted = flat[1:].view(m, 4096)  # 2 bytes past an aligned address
        shifted.copy_(x)
        wide = torch.zeros(m, 4096 + 64, dtype=torch.float16, device=DEV)[:, :4096]  # row stride 4160
        wide.copy_(x)
        for variant in (shifted, wide):  # (cuBLAS may pick another algorithm for these: no bitwise check)
            for fn in (tri.forward_gemm, tri.forward) + ((tri.forward_decode,) if m <= 16 else ()):
                assert relative_error(fn(variant), x.float() @ weight) < 2e-3
    tri.to(torch.float32)  # scales and zero points become float32: the plans compiled for float16 must go
    x = torch.randn(8, 4096, generator=gen, device=DEV).half()
    for fn in (tri.forward_decode, tri.forward_gemm, tri.forward_dequant):
        assert relative_error(fn(x), x.float() @ weight) < 2e-3


@pytest.mark.parametrize("k,n", LLAMA2_7B + LLAMA2_70B, ids=[f"{k}x{n}" for k, n in LLAMA2_7B + LLAMA2_70B])
def test_4bit_g128_act_order_layer_shapes(k, n):
    tri, weight, gen = make_modules(k, n, 4, 128, True, sym=False, seed=k + n)
    check_paths(tri, weight, gen, (1, 3, 8, 16, 32, 512))


SETTINGS = [
    (b, g, a, s, f)
    for b in (2, 3, 4, 8)
    for g, a, s, f in ((128, True, False, "gptq"), (32, True, True, "gptq_v2"), (-1, False, False, "gptq_v2"))
]


@pytest.mark.parametrize(
    "bits,group_size,act_order,sym,fmt",
    SETTINGS,
    ids=[f"{b}bit-g{g}-{'act' if a else 'noact'}-{'sym' if s else 'asym'}-{f}" for b, g, a, s, f in SETTINGS],
)
@pytest.mark.parametrize("k,n", [(4096, 11008), (28672, 8192)], ids=["7b-up", "70b-down"])
def test_every_bit_width(k, n, bits, group_size, act_order, sym, fmt):
    tri, weight, gen = make_modules(k, n, bits, group_size, act_order, sym, fmt, seed=bits)
    check_paths(tri, weight, gen, (1, 5, 24, 512) if k < 10000 else (1, 16, 300))


def test_decode_is_deterministic():
    """The split-K partials are summed in a fixed order by the last program: repeated calls agree bit for bit.
    A race in the counter protocol would show up here as varying results."""
    tri, weight, gen = make_modules(8192, 1024, 4, 128, True, seed=7)
    x = torch.randn(4, 8192, generator=gen, device=DEV).half()
    first = tri.forward_decode(x)
    for _ in range(50):
        assert torch.equal(tri.forward_decode(x), first)
    assert relative_error(first, x.float() @ weight) < 2e-3


@pytest.mark.parametrize("bits", [4, 3])
def test_whole_model_logits_agree(tmp_path, bits):
    """A random-weight Llama-2-7B-shaped checkpoint (two of its blocks: hidden 4096, MLP 11008, real layout)
    gives the same logits through every GPU kernel and the torch reference, and matches the float model."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from tiny_checkpoints import build, llama_config

    hf_config = llama_config(hidden=4096, intermediate=11008, layers=2, vocab=512)  # 7B's Linear shapes
    ck = build(
        tmp_path / "ck", bits=bits, group_size=128, desc_act=True, sym=False, hf_config=hf_config, seed=SEED % 1000
    )
    from gptq_bridge.kernels.cuda import mma as cuda_gptq

    kernels = (
        ["triton", "torch"]
        + (["exllama"] if HAVE_EXLLAMA and bits == 4 else [])
        + (["mma"] if cuda_gptq.kernel_spec().check_available() is None else [])
    )
    models = {k: gptq_bridge.load_model(str(ck.path), kernel=k, device="cuda", dtype=torch.float16) for k in kernels}
    assert all(m.kernel == k for k, m in models.items())
    reference = ck.reference.to(DEV)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for shape in ((1, 1), (1, 12), (2, 300)):
            ids = torch.randint(0, 512, shape, generator=gen).to(DEV)
            want = models["torch"].model(ids).logits.float()
            fp = reference(ids).logits
            assert relative_error(want, fp) < 2e-2
            # triton does the reference's arithmetic (float32 sums): it must agree closely
            assert relative_error(models["triton"].model(ids).logits.float(), want) < 1e-2, (
                f"shape {shape} (seed {SEED})"
            )
            # every kernel is as close to the float model as the reference kernel must be; exllama sums in
            # float16 (cuBLAS half for m > 32), measured 1.3e-2 from the reference's logits at (2, 300)
            for name in kernels[2:]:
                got = models[name].model(ids).logits.float()
                assert relative_error(got, fp) < 2e-2, f"{name}, shape {shape} (seed {SEED})"


def test_decode_with_outlier_activations():
    """Llama activations have a few channels in the thousands; the half2 decode path must not overflow."""
    tri, weight, gen = make_modules(8192, 1024, 4, 128, True, seed=11)
    x = torch.randn(1, 8192, generator=gen, device=DEV)
    idx = torch.randint(0, 8192, (16,), generator=gen, device=DEV)
    x[0, idx] = 3000.0 * torch.sign(torch.randn(16, generator=gen, device=DEV))
    x = x.half()
    got = tri.forward_decode(x)
    assert not torch.isinf(got).any() and not torch.isnan(got).any()
    assert relative_error(got, x.float() @ weight) < 2e-3


# --- exllama (exllamav2's kernel; skipped where the package is missing) -------------------------------------

needs_exllama = pytest.mark.skipif(not HAVE_EXLLAMA, reason=f"exllama: {exllama.kernel_spec().check_available()}")
EXLLAMA_SETTINGS = [
    (128, True, False, "gptq"),
    (32, True, True, "gptq_v2"),
    (128, False, False, "gptq"),
    (-1, False, True, "gptq"),
]


@needs_exllama
@pytest.mark.parametrize(
    "group_size,act_order,sym,fmt",
    EXLLAMA_SETTINGS,
    ids=[f"g{g}-{'act' if a else 'noact'}-{'sym' if s else 'asym'}-{f}" for g, a, s, f in EXLLAMA_SETTINGS],
)
@pytest.mark.parametrize("k,n", LLAMA2_7B + LLAMA2_70B, ids=[f"{k}x{n}" for k, n in LLAMA2_7B + LLAMA2_70B])
def test_exllama_matches_reference(k, n, group_size, act_order, sym, fmt):
    ex, weight, gen = make_modules(
        k, n, 4, group_size, act_order, sym, fmt, seed=k + n + 1, kernel=exllama.ExllamaQuantLinear
    )
    for m in (1, 3, 8, 32, 64, 512):
        x = torch.randn(m, k, generator=gen, device=DEV).half()
        got = ex(x)
        assert got.shape == (m, n) and got.dtype == torch.float16 and not torch.isnan(got).any()
        err = relative_error(got, x.float() @ weight)
        # exllamav2 sums in float16 (per 128-row block, then across blocks; cuBLAS fp16 for m > 32): a desk
        # simulation of its arithmetic gave 1.1e-3 at K = 4096 and 2.3e-3 at K = 28672
        assert err < (5e-3 if m <= 32 else 1e-2), f"exllama m={m}: relative error {err:.2e} (seed {SEED})"


@needs_exllama
def test_exllama_refuses_a_v2_zero_of_zero():
    gen = torch.Generator(device=DEV).manual_seed(SEED)
    layer = random_layer(4096, 4096, 4, 128, True, False, gen)
    layer.zeros[0, 0] = 0
    config = QuantizeConfig(bits=4, group_size=128, desc_act=True, sym=False, checkpoint_format="gptq_v2")
    module = exllama.ExllamaQuantLinear(
        LayerShape(name="l", in_features=4096, out_features=4096), config, torch.float16
    )
    for key, value in pack_layer(layer, 4, "gptq_v2").items():
        setattr(module, key, value.half() if value.is_floating_point() else value)
    module.fill_missing()
    with pytest.raises(KernelError, match="zero point of 0"):
        module.prepare()


@needs_exllama
def test_exllama_prepare_is_idempotent_and_takes_zero_rows():
    ex, weight, gen = make_modules(4096, 4096, 4, 128, True, False, "gptq", seed=3, kernel=exllama.ExllamaQuantLinear)
    ex.prepare()  # a second call must not re-shuffle the (already shuffled) weight
    x = torch.randn(2, 4096, generator=gen, device=DEV).half()
    assert relative_error(ex(x), x.float() @ weight) < 5e-3
    assert ex(torch.empty(0, 4096, device=DEV, dtype=torch.float16)).shape == (0, 4096)
    assert relative_error(ex(x), x.float() @ weight) < 5e-3  # and no CUDA error was left behind


# --- mma (gptq-bridge's gptq_mma.cu; built with nvcc on first use) ---------------------------------------------

from gptq_bridge.kernels.cuda import mma as cuda_gptq  # noqa: E402

CUDA_REASON = cuda_gptq.kernel_spec().check_available()
needs_cuda_kernel = pytest.mark.skipif(CUDA_REASON is not None, reason=f"cuda kernel: {CUDA_REASON}")
CUDA_SETTINGS = [
    (128, True, False, "gptq"),
    (32, True, True, "gptq_v2"),
    (64, False, False, "gptq"),
    (-1, False, True, "gptq"),
    (48, True, False, "gptq"),
]  # 48: padded to 64 slots a group


def check_cuda(mod, weight, gen, ms, bias=None):
    for m in ms:
        x = torch.randn(m, mod.in_features, generator=gen, device=DEV).half()
        want = x.float() @ weight + (bias.float() if bias is not None else 0)
        got = mod(x)
        assert got.shape == (m, mod.out_features) and got.dtype == torch.float16
        assert not torch.isnan(got).any(), f"m={m}: NaN (seed {SEED})"
        err = relative_error(got, want)
        assert err < 2e-3, f"m={m}: relative error {err:.2e} (seed {SEED})"
        if m <= cuda_gptq.FEW_ROWS_MAX_M:  # split-K sums in a fixed order: bit-identical calls
            assert torch.equal(mod(x), got), f"m={m}: a second call differs (seed {SEED})"


@needs_cuda_kernel
@pytest.mark.parametrize(
    "group_size,act_order,sym,fmt",
    CUDA_SETTINGS,
    ids=[f"g{g}-{'act' if a else 'noact'}-{'sym' if s else 'asym'}-{f}" for g, a, s, f in CUDA_SETTINGS],
)
@pytest.mark.parametrize("k,n", LLAMA2_7B + LLAMA2_70B, ids=[f"{k}x{n}" for k, n in LLAMA2_7B + LLAMA2_70B])
@pytest.mark.parametrize("bits", [4, 3], ids=["4bit", "3bit"])
def test_cuda_matches_reference(k, n, group_size, act_order, sym, fmt, bits):
    mod, weight, gen = make_modules(
        k, n, bits, group_size, act_order, sym, fmt, seed=k + n + 7 + bits, kernel=cuda_gptq.CudaQuantLinear
    )
    check_cuda(mod, weight, gen, (1, 3, 8, 9, 16, 17, 32, 33, 300))


@needs_cuda_kernel
def test_cuda_small_odd_shapes_bias_and_awkward_x():
    """Slots not a multiple of 64 (pad chunk), 48 columns (a column block with one empty warp), a bias, and x
    that is misaligned or strided (m = 40: the many-rows gather's 2-byte path on Hopper)."""
    for (k, n), bits in itertools.product(((96, 48), (4160, 4096)), (4, 3)):
        mod, weight, gen = make_modules(k, n, bits, 32, False, seed=k + bits, kernel=cuda_gptq.CudaQuantLinear)
        bias = torch.randn(n, generator=gen, device=DEV).half()
        mod.bias = bias
        check_cuda(mod, weight, gen, (1, 5, 32, 40), bias=bias)
        for m in (1, 7, 40):
            x = torch.randn(m, k, generator=gen, device=DEV).half()
            flat = torch.empty(m * k + 1, dtype=torch.float16, device=DEV)
            shifted = flat[1:].view(m, k)
            shifted.copy_(x)
            wide = torch.zeros(m, k + 8, dtype=torch.float16, device=DEV)[:, :k]
            wide.copy_(x)
            for variant in (shifted, wide, x.t().contiguous().t()):
                assert torch.equal(mod(variant), mod(x))


@needs_cuda_kernel
def test_cuda_split_counts_agree():
    """Every split count gives the same result up to float32 summation order (the counters reset each call)."""
    for bits in (4, 3):  # 3-bit splits are whole quads of chunks
        mod, weight, gen = make_modules(8192, 1024, bits, 128, True, seed=21, kernel=cuda_gptq.CudaQuantLinear)
        x = torch.randn(4, 8192, generator=gen, device=DEV).half()
        want = x.float() @ weight
        for splits in (1, 2, 7, 64, 128):
            mod.few_rows_config = {"SPLITS": splits}
            for _ in range(3):
                assert relative_error(mod(x), want) < 2e-3, f"{bits}-bit splits={splits} (seed {SEED})"


@needs_cuda_kernel
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability(DEV) != (9, 0),
    reason="q4_many_rows (wgmma) needs compute capability 9.0",
)
def test_cuda_many_rows_every_block_and_split():
    """q4_many_rows at each rows-a-block setting and several split counts, splitting every tile or only the last
    ones, row counts that are no multiple of the block, with a bias, both bit widths: each matches the reference,
    repeated calls are bit-identical (splits are summed in a fixed order), and the dequantize + cuBLAS path
    agrees."""
    for bits in (4, 3):
        mod, weight, gen = make_modules(4096, 1024, bits, 128, True, seed=31 + bits, kernel=cuda_gptq.CudaQuantLinear)
        bias = torch.randn(1024, generator=gen, device=DEV).half()
        mod.bias = bias
        for m in (33, 100, 257):
            x = torch.randn(m, 4096, generator=gen, device=DEV).half()
            want = x.float() @ weight + bias.float()
            for rows, splits in itertools.product((64, 128, 256), (1, 3, 16)):
                tiles = -(-m // rows) * (1024 // cuda_gptq.MANY_ROWS_COLS)
                for whole in sorted({0, tiles // 2, tiles - 1}):
                    mod.many_rows_config = {"ROWS": rows, "SPLITS": splits, "WHOLE": whole}
                    got = mod(x)
                    err = relative_error(got, want)
                    what = f"{bits}-bit m={m} rows={rows} splits={splits} whole={whole}"
                    assert err < 2e-3, f"{what}: {err:.2e} (seed {SEED})"
                    assert torch.equal(mod(x), got), f"{what} (seed {SEED})"
            mod.many_rows_config = None
            assert relative_error(mod(x), want) < 2e-3  # the default plan
            assert relative_error(x @ mod.dequantize() + bias, want) < 2e-3


@needs_cuda_kernel
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_cuda_kernel_on_a_second_device():
    """Layers on cuda:1 and cuda:0 called in turn: each call runs on its own tensors' device (the library's runtime
    is switched per call), few rows and the dequantize path, both bit widths."""
    second = torch.device("cuda:1")
    for bits in (4, 3):
        mods = []
        for dev in (second, DEV):
            mod, weight, gen = make_modules(
                4096, 1024, bits, 128, True, seed=25 + bits, kernel=cuda_gptq.CudaQuantLinear, device=dev
            )
            mods.append((mod, weight, gen))
        for m in (1, 8, 40):
            for mod, weight, gen in mods + mods[:1]:
                x = torch.randn(m, 4096, generator=gen, device=DEV).half().to(mod.cu_words.device)
                got = mod(x)
                assert got.device == x.device
                assert relative_error(got, x.float() @ weight) < 2e-3, f"{bits}-bit m={m} on {x.device} (seed {SEED})"
