"""Kernel selection: a pure function from (settings, layers, device, dtype, kernels, override) to a choice.

Eligible kernels are ordered by priority (what each kernel's author claims), then the kernels with a measured
speed (KernelSpec.measured_us, from bench/kernels.py) on the checkpoint's bit width, costed as WORKLOAD, are
re-ordered by that cost among the places they hold. So measurements decide between measured kernels, and an
unmeasured plugin kernel still goes where its priority puts it (above the slow pure-PyTorch reference, say).

Cheap capability checks run first; `check_available` (which may import or compile an extension) runs only
for a kernel that passed all of them, so a CPU machine never tries to build a CUDA kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import QuantizeConfig
from .errors import KernelError
from .types import DeviceInfo, KernelChoice, KernelSpec, KernelVerdict, LayerShape


def needs_act_order(config: QuantizeConfig) -> bool:
    """True when g_idx can be non-monotonic, i.e. a kernel must handle rows of mixed groups."""
    return config.desc_act and config.group_size != -1 and not config.static_groups


def _fmt(values) -> str:
    return ", ".join(str(v) for v in sorted(values))


def why_not(
    spec: KernelSpec,
    config: QuantizeConfig,
    layers: Sequence[LayerShape],
    device: DeviceInfo,
    dtype: torch.dtype,
) -> str | None:
    """Why `spec` cannot serve this checkpoint here, or None when it can."""
    if config.bits not in spec.bits:
        return f"supports {_fmt(spec.bits)}-bit, checkpoint is {config.bits}-bit"
    if spec.group_sizes is not None and config.group_size not in spec.group_sizes:
        return f"supports group sizes {_fmt(spec.group_sizes)}, checkpoint uses {config.group_size}"
    if needs_act_order(config) and not spec.act_order:
        return "does not support act-order (desc_act) with groups"
    if not config.sym and not spec.asymmetric:
        return "supports symmetric checkpoints only (sym: false here)"
    if config.checkpoint_format not in spec.zero_formats:
        return f"does not read the {config.checkpoint_format!r} zero-point format"
    if device.type not in spec.devices:
        return f"runs on {_fmt(spec.devices)}, not {device.type}"
    if spec.min_capability is not None and device.type == "cuda":
        if device.capability is None or tuple(device.capability) < tuple(spec.min_capability):
            have = "unknown" if device.capability is None else "{}.{}".format(*device.capability)
            return "needs compute capability >= {}.{}, device has {}".format(*spec.min_capability, have)
    if dtype not in spec.dtypes:
        return f"computes in {_fmt(str(d).removeprefix('torch.') for d in spec.dtypes)}, not {str(dtype).removeprefix('torch.')}"
    for layer in layers:
        problem = spec.check_layer(layer, config)
        if problem:
            return f"layer {layer.name} ({layer.in_features}x{layer.out_features}): {problem}"
    return spec.check_model(layers, config, device, dtype) or spec.check_available()


# What kernels are ranked by: one chat turn, a 512-token prompt in one call then 128 tokens decoded one row at
# a time, from each kernel's measured microseconds per call (KernelSpec.measured_us).
WORKLOAD: dict[int, int] = {512: 1, 1: 128}
WORKLOAD_TEXT = (
    "one decoder layer's Linears for a 512-token prompt plus 128 decoded tokens (Llama-2-70B's on CUDA, from "
    "bench/kernels.py; the default model's on the CPU, from bench/cpu_decode.py), on the device type it was "
    "measured on (gptq_bridge/kernels/measured.py)"
)


def workload_us(spec: KernelSpec, bits: int, device: DeviceInfo) -> float | None:
    """Measured microseconds of WORKLOAD for `bits` on this device type, or None when not measured."""
    if spec.measured_on != device.type:
        return None
    try:
        return sum(calls * spec.measured_us[(bits, m)] for m, calls in WORKLOAD.items())
    except KeyError:
        return None


def _rank(verdicts: list[KernelVerdict]) -> list[KernelVerdict]:
    """Eligible first, in the given (priority) order, except that the measured ones fill the places they hold
    in order of measured cost; then the ineligible ones."""
    eligible = [v for v in verdicts if v.eligible]
    by_cost = iter(sorted((v for v in eligible if v.workload_us is not None), key=lambda v: v.workload_us))
    ordered = [next(by_cost) if v.workload_us is not None else v for v in eligible]
    return ordered + [v for v in verdicts if not v.eligible]


def select_kernel(
    config: QuantizeConfig,
    layers: Sequence[LayerShape],
    device: DeviceInfo,
    dtype: torch.dtype,
    kernels: Sequence[KernelSpec],
    override: str = "auto",
) -> KernelChoice:
    """Rank every kernel (eligible first; by priority, measured ones by cost among their places) and pick the
    best, or the one asked for."""
    ranked = sorted(kernels, key=lambda k: -k.priority)  # stable: registration order breaks ties
    verdicts = []
    for spec in ranked:
        reason = why_not(spec, config, layers, device, dtype)
        verdicts.append(
            KernelVerdict(
                name=spec.name,
                aliases=sorted(spec.aliases),
                eligible=reason is None,
                reason=reason or "eligible",
                workload_us=workload_us(spec, config.bits, device),
            )
        )
    verdicts = _rank(verdicts)
    if override != "auto":
        match = [v for v in verdicts if override == v.name or override in v.aliases]
        if not match:
            names = ", ".join(k.name for k in ranked) or "none"
            raise KernelError(f"kernel {override!r} is not registered (registered: {names})")
        if not match[0].eligible:
            raise KernelError(f"kernel {override!r} cannot serve this checkpoint on {device}: {match[0].reason}")
        return KernelChoice(chosen=match[0].name, verdicts=verdicts)
    eligible = [v for v in verdicts if v.eligible]
    if not eligible:
        details = "; ".join(f"{v.name}: {v.reason}" for v in verdicts) or "no kernels are registered"
        raise KernelError(f"no kernel can serve this checkpoint on {device} ({details})")
    return KernelChoice(chosen=eligible[0].name, verdicts=verdicts)
