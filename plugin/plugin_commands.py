"""`gptq-bridge plugins`: which plugins are registered, the hooks each implements, and the installed entry points."""

from __future__ import annotations

import json
import os

from .hookspecs import hookimpl


def plugin_report() -> dict:
    """The registered plugins (built-ins first, in the order they were registered) and every entry point of
    the `gptq_bridge` group, loaded or not (GPTQ_BRIDGE_LOAD_PLUGINS may leave some out)."""
    from .plugins import DEFAULT_PLUGINS, LOAD_PLUGINS_ENV, entry_points, get_plugin_manager

    pm = get_plugin_manager()
    available = entry_points()
    plugins = []
    for name, plugin in pm.list_name_plugin():
        ep = available.get(name)
        plugins.append(
            {
                "name": name,
                "module": getattr(plugin, "__name__", type(plugin).__name__),
                "builtin": name in DEFAULT_PLUGINS,
                "hooks": sorted(
                    impl.function.__name__
                    for caller in pm.get_hookcallers(plugin) or []
                    for impl in caller.get_hookimpls()
                    if impl.plugin is plugin
                ),
                "distribution": f"{ep.dist.name} {ep.dist.version}" if ep is not None and ep.dist is not None else None,
            }
        )
    eps = [
        {
            "name": ep.name,
            "value": ep.value,
            "distribution": ep.dist.name if ep.dist is not None else None,
            "loaded": pm.has_plugin(ep.name),
        }
        for ep in sorted(available.values(), key=lambda e: e.name)
    ]
    return {"plugins": plugins, "entry_points": eps, "load_plugins": os.environ.get(LOAD_PLUGINS_ENV)}


def format_report(report: dict) -> str:
    lines = []
    for p in report["plugins"]:
        where = "built-in" if p["builtin"] else (p["distribution"] or p["module"])
        lines.append(f"{p['name']}  ({where})")
        lines.append(f"    hooks: {', '.join(p['hooks']) or 'none'}")
    lines.append("")
    if report["entry_points"]:
        lines.append("entry points (group gptq_bridge):")
        for ep in report["entry_points"]:
            state = "loaded" if ep["loaded"] else "not loaded"
            lines.append(f"  {ep['name']} = {ep['value']}  ({ep['distribution']}; {state})")
    else:
        lines.append("entry points (group gptq_bridge): none installed")
    chosen = report["load_plugins"]
    lines.append("GPTQ_BRIDGE_LOAD_PLUGINS: " + ("unset (every entry point loads)" if chosen is None else repr(chosen)))
    return "\n".join(lines)


def _cmd_plugins(args) -> int:
    report = plugin_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


@hookimpl
def gptq_register_commands(subparsers):
    p = subparsers.add_parser("plugins", help="the registered plugins, their hooks, and the installed entry points")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_plugins)
