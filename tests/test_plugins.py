"""Plugins take part through the hooks: one registered from a test, and one found through an entry point."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_checkpoints import build, relative_error

import gptq_bridge
from gptq_bridge import hookimpl
from gptq_bridge.kernels.torch_ref import TorchQuantLinear
from gptq_bridge.plugins import DEFAULT_PLUGINS, get_plugin_manager, registered_kernels
from gptq_bridge.types import GenerationChunk, GenerationRequest, GenerationResult, KernelSpec, ResolvedSource, Usage


class CountingLinear(TorchQuantLinear):
    """A third-party kernel: the reference maths, counting its calls so the test can see it ran."""

    calls = 0

    def forward(self, x):
        CountingLinear.calls += 1
        return super().forward(x)


class KernelPlugin:
    @hookimpl
    def gptq_register_kernels(self, register):
        register(
            KernelSpec(
                name="counting",
                description="test kernel",
                bits=frozenset({4}),
                devices=frozenset({"cpu"}),
                priority=10,
                factory=lambda layer, config, dtype: CountingLinear(layer, config, dtype),
            )
        )


def test_registered_kernel_is_selected_and_used(tmp_path, plugin):
    plugin(KernelPlugin())
    ck = build(tmp_path / "ck", bits=4, group_size=32)
    CountingLinear.calls = 0
    lm = gptq_bridge.load_model(str(ck.path), device="cpu", engine="off")  # engine off: no fused projections
    assert lm.kernel == "counting"
    assert [v.name for v in lm.choice.verdicts][:4] == ["counting", "cpu-int4", "torch-dense", "torch"]
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert relative_error(lm.model(ids).logits, ck.reference(ids).logits) < 1e-4
    assert CountingLinear.calls == 14  # 7 Linears x 2 layers
    # it serves only 4-bit: a 3-bit checkpoint falls through to the reference kernel, with the reason
    ck3 = build(tmp_path / "ck3", bits=3, group_size=32)
    lm3 = gptq_bridge.load_model(str(ck3.path), device="cpu")
    assert lm3.kernel == "torch-dense"
    assert {v.name: v.reason for v in lm3.choice.verdicts}["counting"] == "supports 4-bit, checkpoint is 3-bit"


def test_duplicate_kernel_names_are_refused(plugin):
    class Twin:
        @hookimpl
        def gptq_register_kernels(self, register):
            register(
                KernelSpec(
                    name="torch",
                    description="clash",
                    bits=frozenset({4}),
                    devices=frozenset({"cpu"}),
                    factory=TorchQuantLinear,
                )
            )

    plugin(Twin())
    with pytest.raises(gptq_bridge.GPTQBridgeError, match="two plugins register a kernel named 'torch'"):
        registered_kernels()


def test_loader_plugin_takes_over_before_the_builtin(tmp_path, plugin):
    seen = []

    class Loader:
        @hookimpl
        def gptq_load_model(self, source, options):
            seen.append(source.path)
            return None  # declines: the built-in loader goes next

    plugin(Loader())
    ck = build(tmp_path / "ck")
    lm = gptq_bridge.load_model(str(ck.path), device="cpu")
    assert seen == [ck.path.resolve()] and lm.kernel == "cpu-int4"

    class Taker:
        @hookimpl
        def gptq_load_model(self, source, options):
            return "taken"

    plugin(Taker())
    assert gptq_bridge.load_model(str(ck.path), device="cpu") == "taken"


def test_generator_plugin_is_called_with_typed_request(plugin):
    class Echo:
        @hookimpl(tryfirst=True)
        def gptq_generate(self, model, request, cancel):
            text = request.prompt.upper()
            yield GenerationChunk(text=text, full_text=text, token_ids=[1])
            yield GenerationResult(text=text, finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1))

    plugin(Echo())
    events = list(
        get_plugin_manager().hook.gptq_generate(model=None, request=GenerationRequest(prompt="hi"), cancel=None)
    )
    assert events[0].text == "HI" and events[-1].finish_reason == "stop"


ENTRY_POINT_PLUGIN = """
from gptq_bridge import hookimpl
from gptq_bridge.kernels.torch_ref import TorchQuantLinear
from gptq_bridge.types import KernelSpec

@hookimpl
def gptq_register_kernels(register):
    register(KernelSpec(name="from-entry-point", description="installed plugin", bits=frozenset({4}),
                        devices=frozenset({"cpu"}), priority=5, factory=TorchQuantLinear))

@hookimpl
def gptq_register_commands(subparsers):
    p = subparsers.add_parser("hello", help="a command from a plugin")
    p.set_defaults(func=lambda args: print("hello from a plugin") or 0)
"""


def installed_demo_plugin(tmp_path):
    """A site folder holding a distribution that names `demo_gptq_plugin` in the `gptq_bridge` entry-point group."""
    site = tmp_path / "site"
    (site / "demo_gptq_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "demo_gptq_plugin.py").write_text(ENTRY_POINT_PLUGIN)
    info = site / "demo_gptq_plugin-1.0.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-gptq-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[gptq_bridge]\ndemo = demo_gptq_plugin\n")
    return site


def test_entry_point_plugin_is_discovered(tmp_path):
    """A distribution on sys.path that names a module in the `gptq_bridge` entry-point group is loaded."""
    site = installed_demo_plugin(tmp_path)
    ck = build(tmp_path / "ck", bits=4, group_size=32)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(site)!r})
        import gptq_bridge
        from gptq_bridge import cli
        lm = gptq_bridge.load_model({str(ck.path)!r}, device="cpu")
        print("kernel", lm.kernel)
        cli.main(["hello"])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "kernel from-entry-point" in out and "hello from a plugin" in out


def run_plugins_command(site, env_value: str | None, *extra_paths) -> subprocess.CompletedProcess:
    """`gptq-bridge plugins --json` in a fresh process with `site` importable and GPTQ_BRIDGE_LOAD_PLUGINS set
    (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "GPTQ_BRIDGE_LOAD_PLUGINS"}
    if env_value is not None:
        env["GPTQ_BRIDGE_LOAD_PLUGINS"] = env_value
    env["PYTHONPATH"] = os.pathsep.join([str(site), *map(str, extra_paths), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "gptq_bridge.cli", "plugins", "--json"], capture_output=True, text=True, env=env
    )


@pytest.mark.parametrize(
    "env_value,loaded",
    [
        (None, {"demo", "textgen", "serve"}),  # unset: every entry point (the package's own two among them)
        ("", set()),  # none: the built-ins only
        ("demo", {"demo"}),
        (" textgen , demo ", {"demo", "textgen"}),
    ],
)
def test_load_plugins_variable_chooses_the_entry_point_plugins(tmp_path, env_value, loaded):
    proc = run_plugins_command(installed_demo_plugin(tmp_path), env_value)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    registered = {p["name"] for p in report["plugins"] if not p["builtin"]}
    assert registered == loaded
    assert {e["name"]: e["loaded"] for e in report["entry_points"]} == {
        "demo": "demo" in loaded,
        "textgen": "textgen" in loaded,
        "serve": "serve" in loaded,
    }
    builtins = [p for p in report["plugins"] if p["builtin"]]
    assert [p["name"] for p in builtins] == list(DEFAULT_PLUGINS)
    demo = [p for p in report["plugins"] if p["name"] == "demo"]
    assert not demo or (
        demo[0]["hooks"] == ["gptq_register_commands", "gptq_register_kernels"]
        and demo[0]["distribution"] == "demo-gptq-plugin 1.0"
    )


def test_load_plugins_variable_takes_module_names_and_refuses_unknown_ones(tmp_path):
    site = installed_demo_plugin(tmp_path)
    (site / "unlisted_gptq_plugin.py").write_text(ENTRY_POINT_PLUGIN.replace("from-entry-point", "unlisted"))
    proc = run_plugins_command(site, "unlisted_gptq_plugin")
    assert proc.returncode == 0, proc.stderr
    assert [p["name"] for p in json.loads(proc.stdout)["plugins"] if not p["builtin"]] == ["unlisted_gptq_plugin"]
    proc = run_plugins_command(site, "no_such_plugin")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "GPTQ_BRIDGE_LOAD_PLUGINS: 'no_such_plugin' is neither an entry point" in proc.stderr


def test_misspelt_hook_fails_when_the_plugin_loads(tmp_path):
    """A hook implementation whose name is no hook of the contract is an error naming the plugin and the hook,
    not a function that is silently never called."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "misspelt_plugin.py").write_text(
        textwrap.dedent("""
        from gptq_bridge import hookimpl

        @hookimpl
        def gptq_register_kernel(register):  # the hook is gptq_register_kernels
            pass
    """)
    )
    proc = run_plugins_command(site, "misspelt_plugin")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "plugin 'misspelt_plugin'" in proc.stderr and "gptq_register_kernel" in proc.stderr
    (site / "wrong_argument_plugin.py").write_text(
        textwrap.dedent("""
        from gptq_bridge import hookimpl

        @hookimpl
        def gptq_register_kernels(registry):  # the argument is `register`
            pass
    """)
    )
    proc = run_plugins_command(site, "wrong_argument_plugin")
    assert proc.returncode == 1 and "plugin 'wrong_argument_plugin'" in proc.stderr and "registry" in proc.stderr


def test_source_plugin_resolves_its_own_spelling_before_the_builtin(tmp_path, plugin):
    ck = build(tmp_path / "ck", bits=4, group_size=32)

    class Shelf:
        """Serves `shelf:NAME` from a folder of checkpoints; leaves every other spelling to the next resolver."""

        @hookimpl
        def gptq_resolve_source(self, source, revision, allow_pickle):
            if not source.startswith("shelf:"):
                return None
            return ResolvedSource(text=source, path=tmp_path / source.removeprefix("shelf:"), revision=revision)

    plugin(Shelf())
    lm = gptq_bridge.load_model("shelf:ck", device="cpu")
    assert lm.source.text == "shelf:ck" and lm.source.path == ck.path
    assert gptq_bridge.load_model(str(ck.path), device="cpu").source.path == ck.path.resolve()  # the built-in
    with pytest.raises(gptq_bridge.SourceError, match="not a hub id"):
        gptq_bridge.load_model("shelf-less:ck", device="cpu")


def test_registries_check_what_plugins_register(plugin):
    from gptq_bridge.prompts import registered_prompt_formats
    from gptq_bridge.types import PromptFormat

    class Formats:
        @hookimpl
        def gptq_register_prompt_formats(self, register):
            register(PromptFormat(name="chatml", description="a second chatml", render=lambda messages, **kw: ""))

    plugin(Formats())
    with pytest.raises(
        gptq_bridge.GPTQBridgeError,
        match="two plugins register a prompt format named 'chatml'; prompt format names must be unique",
    ):
        registered_prompt_formats()

    class NotASpec:
        @hookimpl
        def gptq_register_kernels(self, register):
            register({"name": "dict-kernel"})

    plugin(NotASpec())
    with pytest.raises(
        gptq_bridge.GPTQBridgeError, match="registered {'name': 'dict-kernel'} as a kernel; expected a KernelSpec"
    ):
        registered_kernels()


def test_kernel_aliases_may_not_clash_with_other_names(plugin):
    class Squatter:
        @hookimpl
        def gptq_register_kernels(self, register):
            register(
                KernelSpec(
                    name="cuda",
                    description="takes the mma kernel's old name",
                    bits=frozenset({4}),
                    devices=frozenset({"cpu"}),
                    factory=TorchQuantLinear,
                )
            )

    plugin(Squatter())
    with pytest.raises(gptq_bridge.GPTQBridgeError, match="two plugins register a kernel named 'cuda'"):
        registered_kernels()
