"""`explain`: which kernel would serve a checkpoint here, and why each other kernel would not."""

from __future__ import annotations

import torch
from pydantic import BaseModel

from .api import load_options
from .config import QuantizeConfig
from .hookspecs import hookimpl
from .loader import plan_load
from .plugins import resolve
from .selection import WORKLOAD_TEXT
from .types import KernelVerdict


class Explanation(BaseModel):
    source: str
    path: str
    config_file: str
    settings: QuantizeConfig
    device: str
    dtype: str
    layers: int
    chosen: str
    kernels: list[KernelVerdict]
    # a split across devices: one entry per device slot (placement.Placement.to_json), and each device's kernel
    placement: list[dict] | None = None
    placement_lines: list[str] | None = None
    kernel_per_device: dict[str, str] | None = None


def explain(
    source: str,
    *,
    device: str | None = None,
    kernel: str = "auto",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    **split,
) -> Explanation:
    """Plan a load without reading any weights; raises the same errors `load_model` would. `split` takes
    `load_model`'s gpu_split, max_memory, device_map and kv_cache."""
    resolved = resolve(source, revision=revision, allow_pickle=allow_pickle)
    options = load_options(
        kernel=kernel,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        **split,
    )
    dev, dtype = options.device, options.dtype
    plan = plan_load(resolved, options)
    return Explanation(
        source=source,
        path=str(resolved.path),
        config_file=plan.config_file.label,
        settings=plan.config,
        device=str(dev),
        dtype=str(dtype).removeprefix("torch."),
        layers=len(plan.layers),
        chosen=plan.choice.chosen,
        kernels=plan.choice.verdicts,
        placement=plan.placement.to_json() if plan.placement else None,
        placement_lines=plan.placement.describe() if plan.placement else None,
        kernel_per_device={d: c.chosen for d, c in plan.choices.items()} if plan.choices else None,
    )


def describe_settings(config: QuantizeConfig) -> str:
    group = "no group" if config.group_size == -1 else f"group {config.group_size}"
    order = "act-order" if config.desc_act else "no act-order"
    sym = "sym" if config.sym else "asym"
    zeros = "v1 zeros" if config.checkpoint_format == "gptq" else "v2 zeros"
    return f"{config.bits}-bit, {group}, {order}, {sym}, {zeros}"


def format_explanation(e: Explanation) -> str:
    names = {v.name: v.name + "".join(f" (or {a})" for a in v.aliases) for v in e.kernels}
    width = max(len(n) for n in names.values()) + 2
    lines = [
        f"source:   {e.source}" + (f"  ({e.path})" if e.path != e.source else ""),
        f"settings: {describe_settings(e.settings)}  (from {e.config_file})",
        f"device:   {e.device}, {e.dtype}; {e.layers} quantized Linear layers",
        "",
        f"  {'kernel'.ljust(width)}{'eligible':10}{'measured':12}reason",
    ]
    for v in e.kernels:
        mark = "*" if v.name == e.chosen else " "
        cost = f"{v.workload_us / 1000:.1f} ms" if v.workload_us is not None else "-"
        lines.append(f"{mark} {names[v.name].ljust(width)}{('yes' if v.eligible else 'no'):10}{cost:12}{v.reason}")
    lines += ["", "measured: " + WORKLOAD_TEXT, f"chosen: {e.chosen}"]
    if e.placement_lines:
        kernels = ", ".join(f"{k} on {d}" for d, k in (e.kernel_per_device or {}).items())
        lines += ["", f"split across devices (kernels: {kernels}):"] + [f"  {line}" for line in e.placement_lines]
    return "\n".join(lines)


def _cmd_explain(args) -> int:
    import json

    e = explain(
        args.source,
        device=args.device,
        kernel=args.kernel,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        **split_options(args),
    )
    if args.json:
        out = {
            "source": e.source,
            "config_file": e.config_file,
            "chosen": e.chosen,
            "kernels": [v.model_dump() for v in e.kernels],
            "settings": e.settings.to_json_dict(),
            "device": e.device,
            "dtype": e.dtype,
            "layers": e.layers,
            "placement": e.placement,
            "kernel_per_device": e.kernel_per_device,
        }
        print(json.dumps(out, indent=2))
    else:
        print(format_explanation(e))
    return 0


def add_source_arguments(p) -> None:
    """The arguments every command that opens a checkpoint shares."""
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    p.add_argument("--kernel", default="auto", help="force a kernel by name (default: auto)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weight files (they can run code)")


def add_split_arguments(p) -> None:
    """Splitting a model across devices (and the KV cache each device keeps beside its layers)."""
    g = p.add_argument_group("split across devices")
    g.add_argument(
        "--gpu-split",
        default=None,
        metavar="GIB,GIB",
        help="split the model across GPUs: GiB for each, in order (20,24); 'auto' fits it into the free memory "
        "of the GPUs, then the CPU",
    )
    g.add_argument(
        "--max-memory",
        default=None,
        metavar="DEV=SIZE,...",
        help="budget per device, GPUs in order then the CPU: 0=20GiB,1=24GiB,cpu=48GiB (layers on the CPU run "
        "with a CPU kernel)",
    )
    if not any(a.dest == "kv_cache" for a in p._actions):
        g.add_argument(
            "--kv-cache",
            default=None,
            metavar="BUDGET",
            help="the KV cache: tokens (8192) or a size (4GiB); with a split, reserved beside each layer",
        )


def split_options(args) -> dict:
    """`load_model`'s split keywords from the command line (and kv_cache, which a split reserves)."""
    out = {}
    gpu_split = getattr(args, "gpu_split", None)
    if gpu_split is not None and gpu_split.strip().lower() == "auto":
        out["device_map"] = "auto"
    elif gpu_split is not None:
        out["gpu_split"] = gpu_split
    if getattr(args, "max_memory", None) is not None:
        out["max_memory"] = args.max_memory
    kv = getattr(args, "kv_cache", None)
    if kv is not None:
        out["kv_cache"] = int(kv) if kv.isdigit() else kv
    return out


@hookimpl
def gptq_register_commands(subparsers):
    p = subparsers.add_parser("explain", help="which kernel serves a checkpoint on this machine, and why")
    p.add_argument("source", help="model directory or hub id org/name[:branch]")
    add_source_arguments(p)
    add_split_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_explain)
