"""Sources: local directories, and hub ids read offline from a real huggingface_hub cache layout."""

import json
import os
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
from tiny_checkpoints import build, hub_cache, relative_error

import gptq_bridge
from gptq_bridge.errors import SourceError
from gptq_bridge.sources import resolve_source

REPO = "TheBloke/Nous-Hermes-Llama2-70B-GPTQ"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    main = build(tmp_path / "main", bits=4, group_size=-1, desc_act=True, seed=1)
    g32 = build(tmp_path / "g32", bits=4, group_size=32, desc_act=True, seed=2)
    root = tmp_path / "hub"
    commits = hub_cache(root, REPO, {"main": main.path, "gptq-4bit-32g-actorder_True": g32.path})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return {"root": root, "commits": commits, "main": main, "g32": g32}


def test_local_directory(tmp_path):
    ck = build(tmp_path / "ck")
    resolved = resolve_source(str(ck.path))
    assert resolved.path == ck.path.resolve() and resolved.repo_id is None


def test_hub_id_with_branch_in_webui_syntax_and_revision_keyword(cache):
    ids = torch.randint(0, 96, (1, 6))
    for kwargs in (
        {"source": f"{REPO}:gptq-4bit-32g-actorder_True"},
        {"source": REPO, "revision": "gptq-4bit-32g-actorder_True"},
    ):
        # torch-dense: float32 math, so the loaded weights are checked to 1e-4 (cpu-int4 rounds to bfloat16)
        lm = gptq_bridge.load_model(kwargs.pop("source"), device="cpu", kernel="torch-dense", **kwargs)
        assert lm.quantize_config.group_size == 32
        assert lm.source.repo_id == REPO and lm.source.commit == cache["commits"]["gptq-4bit-32g-actorder_True"]
        with torch.no_grad():
            assert relative_error(lm.model(ids).logits, cache["g32"].reference(ids).logits) < 1e-4
    main = gptq_bridge.load_model(REPO, device="cpu")
    assert main.quantize_config.group_size == -1 and main.source.commit == cache["commits"]["main"]


def test_unknown_branch_and_unknown_repo_are_clear_errors(cache):
    with pytest.raises(SourceError, match="gptq-3bit-128g-actorder_True.*not in the hub cache"):
        resolve_source(f"{REPO}:gptq-3bit-128g-actorder_True")
    with pytest.raises(SourceError, match="no directory of that name, and someone/else is not in the hub cache"):
        resolve_source("someone/else")
    with pytest.raises(SourceError, match="names branch 'a' but revision='b'"):
        resolve_source(f"{REPO}:a", revision="b")


def test_not_a_directory_nor_hub_id(tmp_path):
    with pytest.raises(SourceError, match="no such directory, and not a hub id"):
        resolve_source(str(tmp_path / "missing" / "deeper" / "path"))
    f = tmp_path / "file.safetensors"
    f.write_bytes(b"")
    with pytest.raises(SourceError, match="is a file"):
        resolve_source(str(f))


def test_cli_reads_hub_cache_offline(cache):
    env = {**os.environ, "HF_HUB_CACHE": str(cache["root"]), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "gptq_bridge.cli", "explain", f"{REPO}:gptq-4bit-32g-actorder_True", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    data = json.loads(out)
    assert data["chosen"] == "cpu-int4" and data["settings"]["group_size"] == 32
    assert data["config_file"].endswith("quantize_config.json")
