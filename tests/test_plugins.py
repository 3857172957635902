"""Plugins take part through the hooks: one registered from a test, and one found through an entry point."""

import subprocess
import sys
import textwrap

import pytest
import torch

import gptq_bridge
from gptq_bridge import hookimpl
from gptq_bridge.kernels.torch_ref import TorchQuantLinear
from gptq_bridge.plugins import get_plugin_manager, registered_kernels
from gptq_bridge.types import GenerationChunk, GenerationRequest, GenerationResult, KernelSpec, Usage
from tiny_checkpoints import build, relative_error


class CountingLinear(TorchQuantLinear):
    """A third-party kernel: the reference maths, counting its calls so the test can see it ran."""

    calls = 0

    def forward(self, x):
        CountingLinear.calls += 1
        return super().forward(x)


class KernelPlugin:
    @hookimpl
    def gptq_register_kernels(self, register):
        register(KernelSpec(name="counting", description="test kernel", bits=frozenset({4}),
                            devices=frozenset({"cpu"}), priority=10,
                            factory=lambda layer, config, dtype: CountingLinear(layer, config, dtype)))


def test_registered_kernel_is_selected_and_used(tmp_path, plugin):
    plugin(KernelPlugin())
    ck = build(tmp_path / "ck", bits=4, group_size=32)
    CountingLinear.calls = 0
    lm = gptq_bridge.load_model(str(ck.path), device="cpu")
    assert lm.kernel == "counting"
    assert [v.name for v in lm.choice.verdicts][:3] == ["counting", "torch-dense", "torch"]
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
            register(KernelSpec(name="torch", description="clash", bits=frozenset({4}), devices=frozenset({"cpu"}),
                                factory=TorchQuantLinear))

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
    assert seen == [ck.path.resolve()] and lm.kernel == "torch-dense"

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
    events = list(get_plugin_manager().hook.gptq_generate(model=None, request=GenerationRequest(prompt="hi"),
                                                               cancel=None))
    assert events[0].text == "HI" and events[-1].finish_reason == "stop"


ENTRY_POINT_PLUGIN = '''
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
'''


def test_entry_point_plugin_is_discovered(tmp_path):
    """A distribution on sys.path that names a module in the `gptq_bridge` entry-point group is loaded."""
    site = tmp_path / "site"
    (site / "demo_gptq_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "demo_gptq_plugin.py").write_text(ENTRY_POINT_PLUGIN)
    info = site / "demo_gptq_plugin-1.0.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-gptq-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[gptq_bridge]\ndemo = demo_gptq_plugin\n")
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
