"""`explain`: the chosen kernel and every kernel's verdict, as text and as JSON, without reading weights."""

import json

import pytest
import torch
from tiny_checkpoints import build

from gptq_bridge import cli
from gptq_bridge.explain import explain


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build(
        tmp_path_factory.mktemp("explain") / "ck", bits=3, group_size=128, desc_act=True, config_location="config"
    ).path


def test_text_table(checkpoint, capsys):
    assert cli.main(["explain", str(checkpoint), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "settings: 3-bit, group 128, act-order, sym, v1 zeros  (from " in out
    assert "config.json[quantization_config]" in out
    assert "14 quantized Linear layers" in out
    assert "* torch-dense" in out and out.strip().endswith("chosen: torch-dense")


def test_json_object(checkpoint, capsys):
    assert cli.main(["explain", str(checkpoint), "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"] == str(checkpoint) and data["chosen"] == "torch-dense"
    assert data["config_file"].endswith("config.json[quantization_config]")
    names = [k["name"] for k in data["kernels"]]
    assert {"torch", "torch-dense"} <= set(names) and all(
        set(k) == {"name", "aliases", "eligible", "reason", "workload_us"} for k in data["kernels"]
    )
    assert data["settings"]["bits"] == 3 and data["device"] == "cpu" and data["dtype"] == "float32"


def test_forced_kernel_that_cannot_serve_is_an_error(checkpoint, capsys):
    assert cli.main(["explain", str(checkpoint), "--kernel", "no-such-kernel"]) == 1
    assert "kernel 'no-such-kernel' is not registered" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_device_without_cuda(checkpoint, capsys):
    assert cli.main(["explain", str(checkpoint), "--device", "cuda:0"]) == 1
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_explain_reads_no_weights(checkpoint, tmp_path):
    """Only headers are read: a file whose tensor data is garbage (but complete) still explains."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[header_end:] = b"\xff" * (len(data) - header_end)
    weights.write_bytes(bytes(data))
    assert explain(str(copy), device="cpu").chosen == "torch-dense"
