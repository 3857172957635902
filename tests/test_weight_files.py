"""Weight files: shards with an index, AutoGPTQ's naming, model_file_base_name, safetensors metadata."""

import json
import os

import pytest
import torch
from tiny_checkpoints import build, relative_error

import gptq_bridge
from gptq_bridge.safetensors_io import SafetensorsFile


def logits_match(path, ck):
    lm = gptq_bridge.load_model(str(path), device="cpu", kernel="torch-dense")  # float32 math: exact to 1e-4
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        return relative_error(lm.model(ids).logits, ck.reference(ids).logits) < 1e-4, lm


def test_sharded_with_index(tmp_path):
    ck = build(tmp_path / "ck", bits=4, group_size=32, max_shard_bytes=60_000)
    index = json.loads((ck.path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    ok, lm = logits_match(ck.path, ck)
    assert ok and [p.rsplit("/", 1)[-1] for p in lm.weight_files] == shards


def test_autogptq_file_name_convention(tmp_path):
    ck = build(tmp_path / "ck", bits=4, group_size=128, desc_act=True)
    (ck.path / "model.safetensors").rename(ck.path / "gptq_model-4bit-128g.safetensors")
    (ck.path / "stray.safetensors").write_bytes(b"not used")  # the conventional name wins over a stray file
    ok, lm = logits_match(ck.path, ck)
    assert ok and lm.weight_files[0].endswith("gptq_model-4bit-128g.safetensors")


def test_no_group_file_name_as_on_the_70b_card(tmp_path):
    ck = build(tmp_path / "ck", bits=4, group_size=-1, desc_act=True)
    (ck.path / "model.safetensors").rename(ck.path / "gptq_model-4bit--1g.safetensors")
    assert logits_match(ck.path, ck)[0]


def test_model_file_base_name(tmp_path):
    ck = build(tmp_path / "ck", bits=3, group_size=32, model_file_base_name="nous-hermes-3bit")
    assert (ck.path / "nous-hermes-3bit.safetensors").is_file()
    (ck.path / "other.safetensors").write_bytes(b"not used")
    ok, lm = logits_match(ck.path, ck)
    assert ok and lm.weight_files[0].endswith("nous-hermes-3bit.safetensors")


def test_written_metadata_is_autogptqs(tmp_path):
    ck = build(tmp_path / "ck", bits=4, group_size=128, desc_act=True)
    with SafetensorsFile(ck.path / "model.safetensors") as f:
        meta = f.metadata
        assert f.read("model.layers.0.self_attn.q_proj.qweight").dtype == torch.int32
        assert f.shape("model.layers.0.self_attn.q_proj.scales") == (2, 160)  # 160 = 128 + a partial 32
    assert meta["format"] == "pt" and meta["gptq_bits"] == "4" and meta["gptq_group_size"] == "128"
    assert meta["gptq_desc_act"] == "True"


def test_safetensors_reader_agrees_with_the_safetensors_package(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int32),
        "c": torch.tensor(True),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "t.safetensors", metadata={"k": "v"})
    theirs = load_file(tmp_path / "t.safetensors")
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        assert f.metadata == {"k": "v"} and set(f.keys()) == set(tensors)
        for name in tensors:
            assert torch.equal(f.read(name), theirs[name])


def test_tokenizer_is_loaded_when_shipped(tmp_path):
    ck = build(tmp_path / "ck", tokenizer=True)
    lm = gptq_bridge.load_model(str(ck.path), device="cpu")
    assert lm.tokenizer is not None and lm.tokenizer("the a of")["input_ids"] == [3, 4, 5]
    bare = build(tmp_path / "bare")
    assert gptq_bridge.load_model(str(bare.path), device="cpu").tokenizer is None


def test_progress_names_each_shard_in_order(tmp_path):
    ck = build(tmp_path / "ck", bits=4, group_size=32, max_shard_bytes=60_000)
    lines = []
    lm = gptq_bridge.load_model(str(ck.path), device="cpu", progress=lines.append)
    n = len(lm.weight_files)
    assert n >= 3 and len(lines) == n
    for i, (line, path) in enumerate(zip(lines, lm.weight_files), 1):
        assert line.startswith(f"reading {path.rsplit('/', 1)[-1]} ({i}/{n}, ")


def test_a_written_shard_gives_its_spool_blocks_back(tmp_path):
    """A sharded checkpoint needs little more disk than itself: each shard's bytes leave the spool once copied."""
    from gptq_bridge.writer import CheckpointWriter

    with CheckpointWriter(tmp_path / "out") as writer:
        for i in range(4):
            writer.add(f"t{i}", torch.full((256, 1024), i, dtype=torch.int32))  # 1 MiB each
        spool = writer._spool.fileno()
        writer._spool.flush()
        before = os.fstat(spool).st_blocks
        if before < 4 * 2048:  # the file system allocates lazily or compresses: nothing to measure
            pytest.skip("the spool's blocks are not allocated on this file system")
        names = list(writer._entries)
        writer._write_safetensors(tmp_path / "first.safetensors", names[:2], {})
        after = os.fstat(spool).st_blocks
        released = _release_probe(tmp_path)
        if not released:
            pytest.skip("this file system cannot punch holes")
        assert after <= before - 2 * 2048 + 64, (before, after)  # two of the four MiB given back
        writer.abort()
    with SafetensorsFile(tmp_path / "first.safetensors") as f:  # and the shard holds the data
        assert int(f.read("t1").unique()) == 1


def _release_probe(tmp_path) -> bool:
    from gptq_bridge.writer import _release_range

    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 65536)
    with open(probe, "r+b") as f:
        return _release_range(f.fileno(), 0, 65536)
