"""Kernel selection is a pure function: unit-tested for CPU and (simulated) CUDA devices."""

import pytest
import torch

from gptq_bridge.config import QuantizeConfig
from gptq_bridge.errors import KernelError
from gptq_bridge.kernels.torch_ref import TORCH_KERNEL, TorchQuantLinear
from gptq_bridge.selection import select_kernel
from gptq_bridge.types import DeviceInfo, KernelSpec, LayerShape

LAYERS = [LayerShape(name="model.layers.0.mlp.down_proj", in_features=28672, out_features=8192)]
H100 = DeviceInfo(type="cuda", index=0, capability=(9, 0), name="H100")
T4 = DeviceInfo(type="cuda", index=0, capability=(7, 5), name="T4")
CPU = DeviceInfo(type="cpu")
imports_tried = []


def unavailable():
    imports_tried.append("fast")
    return "package fastgptq is not importable (No module named 'fastgptq')"


EXLLAMA_LIKE = KernelSpec(
    name="exllama-like",
    description="",
    bits=frozenset({4}),
    group_sizes=frozenset({-1, 32, 64, 128}),
    devices=frozenset({"cuda"}),
    priority=30,
    dtypes=frozenset({torch.float16}),
    factory=TorchQuantLinear,
)
MARLIN_LIKE = KernelSpec(
    name="marlin-like",
    description="",
    bits=frozenset({4}),
    group_sizes=frozenset({-1, 128}),
    asymmetric=False,
    devices=frozenset({"cuda"}),
    min_capability=(8, 0),
    priority=40,
    zero_formats=frozenset({"gptq"}),
    dtypes=frozenset({torch.float16}),
    factory=TorchQuantLinear,
)
CUDA_OLD_LIKE = KernelSpec(
    name="cuda-old-like",
    description="",
    bits=frozenset({2, 3, 4, 8}),
    act_order=False,
    devices=frozenset({"cuda"}),
    priority=20,
    factory=TorchQuantLinear,
)
UNAVAILABLE = KernelSpec(
    name="fast",
    description="",
    bits=frozenset({2, 3, 4, 8}),
    devices=frozenset({"cuda"}),
    priority=50,
    factory=TorchQuantLinear,
    check_available=unavailable,
)
ALL = [TORCH_KERNEL, EXLLAMA_LIKE, MARLIN_LIKE, CUDA_OLD_LIKE, UNAVAILABLE]


def choose(device, dtype=torch.float16, override="auto", **settings):
    return select_kernel(QuantizeConfig(**settings), LAYERS, device, dtype, ALL, override)


def reasons(choice):
    return {v.name: v.reason for v in choice.verdicts}


def test_h100_4bit_g128_act_order_picks_highest_priority_eligible():
    choice = choose(H100, bits=4, group_size=128, desc_act=True)
    assert choice.chosen == "marlin-like"
    r = reasons(choice)
    assert r["fast"].startswith("package fastgptq is not importable")
    assert r["cuda-old-like"] == "does not support act-order (desc_act) with groups"
    assert [v.eligible for v in choice.verdicts] == [True, True, True, False, False]  # eligible first


def test_capability_too_low_falls_through():
    choice = choose(T4, bits=4, group_size=128, desc_act=True)
    assert choice.chosen == "exllama-like"
    assert reasons(choice)["marlin-like"] == "needs compute capability >= 8.0, device has 7.5"


@pytest.mark.parametrize(
    "settings,reason_of,expected",
    [
        ({"bits": 3, "group_size": 128}, "exllama-like", "supports 4-bit, checkpoint is 3-bit"),
        ({"bits": 4, "group_size": 32}, "marlin-like", "supports group sizes -1, 128, checkpoint uses 32"),
        (
            {"bits": 4, "group_size": 128, "sym": False},
            "marlin-like",
            "supports symmetric checkpoints only (sym: false here)",
        ),
        (
            {"bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"},
            "marlin-like",
            "does not read the 'gptq_v2' zero-point format",
        ),
    ],
)
def test_each_capability_gives_its_reason(settings, reason_of, expected):
    assert reasons(choose(H100, **settings))[reason_of] == expected


def test_act_order_without_groups_or_with_static_groups_needs_no_act_order_support():
    assert choose(H100, bits=3, group_size=-1, desc_act=True).chosen == "cuda-old-like"
    assert choose(H100, bits=3, group_size=128, desc_act=True, static_groups=True).chosen == "cuda-old-like"
    assert choose(H100, bits=3, group_size=128, desc_act=True).chosen == "torch"


def test_cpu_never_checks_availability_of_cuda_kernels():
    imports_tried.clear()
    choice = choose(CPU, dtype=torch.float32, bits=4, group_size=128)
    assert choice.chosen == "torch" and imports_tried == []
    assert reasons(choice)["exllama-like"] == "runs on cuda, not cpu"


def test_dtype_is_checked():
    assert (
        reasons(choose(H100, dtype=torch.bfloat16, bits=4, group_size=128))["exllama-like"]
        == "computes in float16, not bfloat16"
    )


def test_override():
    assert choose(H100, override="torch", bits=4, group_size=128).chosen == "torch"
    with pytest.raises(
        KernelError,
        match="kernel 'exllama-like' cannot serve this checkpoint on cuda:0: supports 4-bit, checkpoint is 3-bit",
    ):
        choose(H100, override="exllama-like", bits=3, group_size=128)
    with pytest.raises(KernelError, match="kernel 'nope' is not registered"):
        choose(H100, override="nope", bits=4)


def test_layer_shape_checks_name_the_layer():
    odd = [LayerShape(name="model.layers.3.mlp.down_proj", in_features=100, out_features=64)]
    with pytest.raises(
        KernelError,
        match=r"torch: layer model.layers.3.mlp.down_proj \(100x64\): input features must be a multiple of 32",
    ):
        select_kernel(QuantizeConfig(bits=4), odd, CPU, torch.float32, [TORCH_KERNEL])


def test_device_parsing_errors():
    from gptq_bridge.errors import GPTQBridgeError

    assert DeviceInfo.parse("cpu") == CPU
    with pytest.raises(GPTQBridgeError, match="not understood"):
        DeviceInfo.parse("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(GPTQBridgeError, match="torch sees no CUDA device"):
            DeviceInfo.parse("cuda:0")


def test_dense_cpu_kernel_is_preferred_only_when_its_weights_fit(monkeypatch):
    from gptq_bridge.kernels import torch_ref

    kernels = [torch_ref.TORCH_KERNEL, torch_ref.TORCH_DENSE_KERNEL]
    layers = [LayerShape(name="m.l", in_features=8192, out_features=8192)]  # 268 MB dense in float32
    monkeypatch.setattr(torch_ref, "available_memory_bytes", lambda: 16 * 10**9)
    assert select_kernel(QuantizeConfig(bits=4), layers, CPU, torch.float32, kernels).chosen == "torch-dense"
    monkeypatch.setattr(torch_ref, "available_memory_bytes", lambda: 400 * 10**6)
    choice = select_kernel(QuantizeConfig(bits=4), layers, CPU, torch.float32, kernels)
    assert choice.chosen == "torch"
    assert reasons(choice)["torch-dense"] == "dense weights need 0.3 GB, more than half of the 0.4 GB available"
    assert (
        reasons(select_kernel(QuantizeConfig(bits=4), layers, H100, torch.float16, kernels))["torch-dense"]
        == "runs on cpu, not cuda"
    )


# --- ranking by measured speed (KernelSpec.measured_us, costed as selection.WORKLOAD) ----------------------


def measured(name, us, priority=0, on="cuda", bits=frozenset({4})):
    return KernelSpec(
        name=name,
        description="",
        bits=bits,
        devices=frozenset({"cuda", "cpu"}),
        priority=priority,
        measured_us=us,
        measured_on=on,
        factory=TorchQuantLinear,
    )


def test_measured_speed_outranks_priority():
    slow = measured("slow", {(4, 1): 100.0, (4, 512): 500.0}, priority=50)
    fast = measured("fast", {(4, 1): 60.0, (4, 512): 900.0}, priority=1)  # slower prompt, faster decode
    choice = select_kernel(QuantizeConfig(bits=4), LAYERS, H100, torch.float16, [slow, fast])
    assert choice.chosen == "fast"
    costs = {v.name: v.workload_us for v in choice.verdicts}
    assert costs == {"fast": 900.0 + 128 * 60.0, "slow": 500.0 + 128 * 100.0}
    assert [v.name for v in choice.verdicts] == ["fast", "slow"]


def test_unmeasured_kernels_keep_their_priority_place_and_measured_ones_swap_by_cost():
    unmeasured = measured("unmeasured", {}, priority=99)
    partial = measured("partial", {(4, 1): 1.0}, priority=7)  # no 512-row number: not costed
    slow = measured("slow", {(4, 1): 900.0, (4, 512): 9000.0}, priority=50)
    fast = measured("fast", {(4, 1): 70.0, (4, 512): 557.0}, priority=5)
    reference = measured("reference", {(4, 1): 20000.0, (4, 512): 20000.0}, priority=0)
    choice = select_kernel(
        QuantizeConfig(bits=4), LAYERS, H100, torch.float16, [reference, fast, partial, slow, unmeasured]
    )
    # by priority: unmeasured, slow, partial, fast, reference; the measured ones (slow, fast, reference) fill
    # their places (2nd, 4th, 5th) fastest first
    assert [v.name for v in choice.verdicts] == ["unmeasured", "fast", "partial", "slow", "reference"]
    assert choice.chosen == "unmeasured" and reasons(choice)["partial"] == "eligible"


def test_numbers_measured_on_another_device_type_or_bit_width_do_not_count():
    # were they counted, the cheaper kernel would swap ahead of the one that priority puts first
    gpu_timed = measured("gpu-timed", {(4, 1): 1.0, (4, 512): 1.0}, priority=0)
    cpu_timed = measured("cpu-timed", {(4, 1): 100.0, (4, 512): 100.0}, priority=5, on="cpu")
    choice = select_kernel(QuantizeConfig(bits=4), LAYERS, CPU, torch.float16, [gpu_timed, cpu_timed])
    assert choice.chosen == "cpu-timed" and {v.name: v.workload_us for v in choice.verdicts}["gpu-timed"] is None
    three = frozenset({3, 4})
    a = measured("a", {(4, 1): 1.0, (4, 512): 1.0}, priority=0, bits=three)
    b = measured("b", {(3, 1): 9.0, (3, 512): 9.0}, priority=10, bits=three)
    assert select_kernel(QuantizeConfig(bits=3), LAYERS, H100, torch.float16, [a, b]).chosen == "b"
    costs = {
        v.name: v.workload_us
        for v in select_kernel(QuantizeConfig(bits=4), LAYERS, H100, torch.float16, [a, b]).verdicts
    }
    assert costs == {"a": 129.0, "b": None}


def test_builtin_measured_table_is_what_the_registered_kernels_carry(monkeypatch):
    from gptq_bridge.kernels.measured import MEASURED_US
    from gptq_bridge.plugins import registered_kernels
    from gptq_bridge.selection import workload_us

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # register triton as on a GPU machine
    specs = {k.name: k for k in registered_kernels()}
    for name, table in MEASURED_US.items():
        cpu = name in ("cpu-int4", "torch-dense")  # measured on the CPU, the others on the H100
        assert specs[name].measured_us == table and specs[name].measured_on == ("cpu" if cpu else "cuda")
        assert all(bits in specs[name].bits and m >= 1 and us > 0 for (bits, m), us in table.items())
    for bits in (3, 4):  # the card's variants are costed for triton, mma and the reference, 4-bit for exllama
        assert workload_us(specs["triton"], bits, H100) is not None
        assert workload_us(specs["torch"], bits, H100) is not None
    assert workload_us(specs["exllama"], 4, H100) is not None
    assert workload_us(specs["mma"], 4, H100) is not None and workload_us(specs["mma"], 3, H100) is not None
    assert workload_us(specs["cpu-int4"], 4, CPU) < workload_us(specs["torch-dense"], 4, CPU)
    assert workload_us(specs["cpu-int4"], 4, H100) is None  # CPU numbers never rank CUDA kernels


def test_builtin_kernels_on_an_h100_pick_mma_for_4_and_3_bit(monkeypatch):
    """The measured table decides on a (simulated) H100 where every built-in kernel is available: the mma
    kernel's 4-bit chat turn (26.9 ms a layer) beats exllama's (33.1) and triton's (42.9); its 3-bit turn (24.5)
    beats triton's (43.9)."""
    from gptq_bridge.plugins import registered_kernels

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    specs = [k.model_copy(update={"check_available": lambda: None}) for k in registered_kernels()]
    for bits, want in ((4, "mma"), (3, "mma")):
        choice = select_kernel(
            QuantizeConfig(bits=bits, group_size=128, desc_act=True), LAYERS, H100, torch.float16, specs
        )
        assert choice.chosen == want
        costs = [v.workload_us for v in choice.verdicts if v.eligible and v.workload_us is not None]
        assert costs == sorted(costs)


def test_the_old_name_cuda_still_chooses_the_mma_kernel(monkeypatch):
    """`kernel="cuda"` (the mma kernel's name before exllama, also CUDA, made it ambiguous) keeps working."""
    from gptq_bridge.plugins import registered_kernels

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    specs = [k.model_copy(update={"check_available": lambda: None}) for k in registered_kernels()]
    choice = select_kernel(
        QuantizeConfig(bits=4, group_size=128, desc_act=True), LAYERS, H100, torch.float16, specs, "cuda"
    )
    assert choice.chosen == "mma"
    assert next(v for v in choice.verdicts if v.name == "mma").aliases == ["cuda"]
