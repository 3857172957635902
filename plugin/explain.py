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


def explain(
    source: str,
    *,
    device: str | None = None,
    kernel: str = "auto",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Explanation:
    """Plan a load without reading any weights; raises the same errors `load_model` would."""
    resolved = resolve(source, revision=revision, allow_pickle=allow_pickle)
    options = load_options(
        kernel=kernel, device=device, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
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


@hookimpl
def gptq_register_commands(subparsers):
    p = subparsers.add_parser("explain", help="which kernel serves a checkpoint on this machine, and why")
    p.add_argument("source", help="model directory or hub id org/name[:branch]")
    add_source_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_explain)
