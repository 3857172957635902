"""A catalogue of broken checkpoints: each gives one clear error through the API and through the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import build

import gptq_bridge
from gptq_bridge import cli
from gptq_bridge.errors import GPTQBridgeError

WEIGHTS = "model.safetensors"
Q = "model.layers.0.self_attn.q_proj"


def edit_json(name, **changes):
    def apply(d):
        data = json.loads((d / name).read_text())
        data.update(changes)
        (d / name).write_text(json.dumps(data))

    return apply


def edit_tensors(fn, metadata=None):
    def apply(d):
        tensors = load_file(d / WEIGHTS)
        fn(tensors)
        save_file(tensors, d / WEIGHTS, metadata=metadata or {"format": "pt"})

    return apply


def truncate(d):
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) - 1000])


def three_bit_tensors_under_four_bit_config(d):
    other = build(d.parent / "three", bits=3, group_size=32)
    save_file(load_file(other.path / WEIGHTS), d / WEIGHTS, metadata={"format": "pt"})  # no gptq_bits to compare


def index_with_missing_shard(d):
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {f"{Q}.qweight": "model-00002-of-00002.safetensors"}})
    )


def pickle_only(d):
    torch.save(load_file(d / WEIGHTS), d / "pytorch_model.bin")
    (d / WEIGHTS).unlink()


def two_weight_files(d):
    (d / WEIGHTS).rename(d / "b.safetensors")
    (d / "a.safetensors").write_bytes((d / "b.safetensors").read_bytes())


def remote_code(d):
    config = json.loads((d / "config.json").read_text())
    config.update(
        model_type="x-custom",
        auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"},
    )
    (d / "config.json").write_text(json.dumps(config))
    (d / "configuration_x.py").write_text("raise SystemExit('the model code ran without trust_remote_code')\n")


def remove(name):
    return lambda d: (d / name).unlink()


CATALOGUE = {
    "bits-5": (
        edit_json("quantize_config.json", bits=5),
        r"quantize_config.json: key 'bits' has value 5; allowed: 2, 3, 4, 8",
    ),
    "group-size-0": (edit_json("quantize_config.json", group_size=0), r"key 'group_size' has value 0; allowed: -1"),
    "awq": (edit_json("quantize_config.json", quant_method="awq"), r"key 'quant_method' has value 'awq'"),
    "no-config-json": (remove("config.json"), r"config.json is missing"),
    "unknown-architecture": (
        edit_json("config.json", model_type="no-such-model"),
        r"config.json: transformers cannot read this architecture",
    ),
    "no-weights": (remove(WEIGHTS), r"no weight files \(.safetensors\) found"),
    "pickle-refused": (
        pickle_only,
        r"pytorch_model.bin: pickle weight files can run arbitrary code.*allow_pickle=True",
    ),
    "two-files-no-index": (
        two_weight_files,
        r"several .safetensors files \(a.safetensors, b.safetensors\) and no model.safetensors.index.json",
    ),
    "truncated": (
        truncate,
        r"model.safetensors: tensor '.*' ends at byte \d+ but the file has \d+ bytes: the file is truncated",
    ),
    "missing-tensor": (edit_tensors(lambda t: t.pop(f"{Q}.qzeros")), rf"model.safetensors: missing tensors {Q}.qzeros"),
    "wrong-shape": (
        edit_tensors(lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:-1]})),
        rf"tensor '{Q}.scales' has shape \[4, 160\], expected \[5, 160\]; 4 groups stored, 5 expected",
    ),
    "bits-disagree-with-tensors": (
        three_bit_tensors_under_four_bit_config,
        r"qweight' has shape \[\d+, \d+\], expected \[\d+, \d+\]; its shape fits 3-bit weights, the config says 4-bit",
    ),
    "metadata-disagrees": (
        edit_tensors(lambda t: None, metadata={"format": "pt", "gptq_bits": "3"}),
        r"header metadata says gptq_bits=3, but .*quantize_config.json says bits=4",
    ),
    "missing-shard": (index_with_missing_shard, r"lists shard 'model-00002-of-00002.safetensors', which is missing"),
    "unexpected-tensor": (
        edit_tensors(lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)})),
        r"tensor 'model.layers.0.extra.weight' does not belong to the LlamaForCausalLM model",
    ),
    "qweight-on-non-linear": (
        edit_tensors(lambda t: t.update({"model.norm.qweight": torch.zeros(2, dtype=torch.int32)})),
        r"tensor 'model.norm.qweight' has no matching Linear layer",
    ),
    "float-qweight": (
        edit_tensors(lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"].float()})),
        rf"tensor '{Q}.qweight' is torch.float32, expected an integer tensor",
    ),
    "g-idx-out-of-range": (
        edit_tensors(lambda t: t[f"{Q}.g_idx"].__setitem__(0, 9)),
        rf"tensor '{Q}.g_idx' names groups 0..9, but the layer has 5 groups",
    ),
    "remote-code-not-trusted": (remote_code, r"contains custom code.*pass trust_remote_code=True if you trust"),
    "not-json": (
        lambda d: (d / "quantize_config.json").write_text("{bits: 4"),
        r"quantize_config.json: not valid JSON",
    ),
}


@pytest.fixture
def broken(tmp_path, request):
    ck = build(tmp_path / "ck", bits=4, group_size=32, tokenizer=False)
    fn, pattern = CATALOGUE[request.param]
    fn(ck.path)
    return ck.path, pattern


@pytest.mark.parametrize("broken", list(CATALOGUE), indirect=True)
def test_api_error(broken):
    path, pattern = broken
    with pytest.raises(GPTQBridgeError, match=pattern):
        gptq_bridge.load_model(str(path), device="cpu")


@pytest.mark.parametrize("broken", list(CATALOGUE), indirect=True)
def test_cli_error_is_one_line(broken, capsys):
    path, pattern = broken
    assert cli.main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("gptq-bridge: error: ")
    import re

    assert re.search(pattern, err)


def test_pickle_opt_in_loads(tmp_path):
    ck = build(tmp_path / "ck", bits=4, group_size=32)
    pickle_only(ck.path)
    lm = gptq_bridge.load_model(str(ck.path), device="cpu", allow_pickle=True, kernel="torch-dense")  # float32 math
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, ck.reference(ids).logits, atol=1e-4)


def test_real_entry_point_prints_no_traceback_unless_debug(tmp_path):
    ck = build(tmp_path / "ck")
    truncate(ck.path)
    r = subprocess.run([sys.executable, "-m", "gptq_bridge.cli", "check", str(ck.path)], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(
        [sys.executable, "-m", "gptq_bridge.cli", "--debug", "check", str(ck.path)], capture_output=True, text=True
    )
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointError" in r.stderr
