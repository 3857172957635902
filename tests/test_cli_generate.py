"""The `generate`, `chat` and `info` commands: in-process for most, a real terminal (pty) for chat's Ctrl-C."""

import io
import json
import os
import re
import select
import shutil
import signal
import sys
import time

import pytest
from conftest import default_sigint
from gen_models import one_thread  # noqa: F401  (autouse fixture)
from tiny_checkpoints import build

import gptq_bridge
from gptq_bridge.cli import main
from gptq_bridge.errors import GPTQBridgeError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cli") / "tiny", tokenizer=True)


@pytest.fixture(scope="module")
def model_dir(ckpt):
    return str(ckpt.path)


@pytest.fixture(scope="module")
def lm(model_dir):
    return gptq_bridge.load_model(model_dir)


def cli(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def user(text):
    return [{"role": "user", "content": text}]


# --- generate -----------------------------------------------------------------------------------------------


def test_generate_streams_the_answer_to_stdout(capsys, model_dir, lm):
    rc, out, err = cli(capsys, "generate", "the a of", "--model", model_dir, "--max-new-tokens", "8", "--ban-eos")
    assert rc == 0
    assert out == lm.generate(user("the a of"), max_new_tokens=8, ban_eos=True).text + "\n"
    assert "loading" in err and "8 tokens" in err  # progress goes to stderr, not into the answer


def test_generate_with_the_engine_off_or_a_kv_cache_budget(capsys, model_dir, lm):
    want = lm.generate(user("the a of"), max_new_tokens=8, ban_eos=True).text + "\n"
    for flags in (["--engine", "off"], ["--kv-cache", "512"], ["--kv-cache", "64KiB"]):
        rc, out, _ = cli(capsys, "generate", "the a of", "-m", model_dir, "--max-new-tokens", "8", "--ban-eos", *flags)
        assert (rc, out) == (0, want), flags
    rc, out, err = cli(capsys, "generate", "the a of", "-m", model_dir, "--max-new-tokens", "100", "--kv-cache", "64")
    assert rc != 0 and "kv_cache: this request needs" in err and "holds 64" in err
    rc, out, err = cli(capsys, "generate", "the a of", "-m", model_dir, "--kv-cache", "plenty")
    assert rc != 0 and "kv_cache: 'plenty' is not a budget" in err


def test_generate_reads_the_prompt_from_stdin(capsys, monkeypatch, model_dir, lm):
    rc, out, _ = cli(
        capsys,
        "generate",
        "-m",
        model_dir,
        "--max-new-tokens",
        "5",
        "-q",
        "--raw",
        stdin="the of to\n",
        monkeypatch=monkeypatch,
    )
    assert rc == 0 and out == lm.generate("the of to", max_new_tokens=5).text + "\n"


def test_generate_json_with_seed_and_sampling_flags(capsys, model_dir):
    argv = [
        "generate",
        "the a",
        "-m",
        model_dir,
        "--json",
        "-q",
        "--max-new-tokens",
        "6",
        "--temperature",
        "1.3",
        "--top-k",
        "20",
        "--top-p",
        "0.95",
        "--min-p",
        "0.01",
        "--seed",
        "42",
        "--ban-eos",
        "--stop",
        "zzz",
    ]
    rc, out, err = cli(capsys, *argv)
    assert rc == 0 and err == ""
    first = json.loads(out)
    assert first["finish_reason"] == "length" and first["usage"] == {"prompt_tokens": 2, "completion_tokens": 6}
    assert first["seed"] == 42 and first["model"] == model_dir and first["prompt_format"] == "plain"
    _, out, _ = cli(capsys, *argv)
    assert json.loads(out)["token_ids"] == first["token_ids"]
    _, out, _ = cli(capsys, *argv[:-4], "43", "--ban-eos")
    assert json.loads(out)["token_ids"] != first["token_ids"]


def test_generate_with_an_explicit_prompt_format(capsys, model_dir, lm):
    rc, out, _ = cli(
        capsys,
        "generate",
        "the a",
        "-m",
        model_dir,
        "-q",
        "--prompt-format",
        "alpaca",
        "--input",
        "of to",
        "--max-new-tokens",
        "4",
        "--json",
    )
    result = json.loads(out)
    expected = lm.generate(user("the a"), prompt_format="alpaca", input="of to", max_new_tokens=4)
    assert rc == 0 and result["prompt_format"] == "alpaca" and result["token_ids"] == expected.token_ids


def test_generate_truncation_is_reported(capsys, model_dir):
    prompt = " ".join(["the"] * 30)
    rc, out, err = cli(
        capsys,
        "generate",
        prompt,
        "-m",
        model_dir,
        "--raw",
        "--context-length",
        "20",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert rc == 0 and json.loads(out)["truncated_prompt_tokens"] == 14
    assert "first 14 tokens were dropped" in err
    rc, out, err = cli(
        capsys,
        "generate",
        prompt,
        "-m",
        model_dir,
        "--raw",
        "--context-length",
        "20",
        "--max-new-tokens",
        "4",
        "--truncate",
        "error",
    )
    assert rc == 1 and "prompt: 30 tokens, but only 16 fit" in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "hi", "-m", "{model}", "--top-p", "2"], "top_p: Input should be less than or equal to 1"),
        (["generate", "hi", "-m", "{model}", "--temperature", "-1"], "temperature: Input should be greater"),
        (["generate", "hi", "-m", "{model}", "--prompt-format", "nope"], "prompt_format 'nope' is not registered"),
        (["generate", "hi", "-m", "{model}", "--raw", "--system", "s"], "--raw sends the prompt as it is"),
        (["generate", "hi", "-m", "{model}", "--max-new-tokens", "999"], "max_new_tokens: 999"),
        (["generate", "hi", "-m", "{model}", "--ban-token", "4000"], "banned_token_ids: 4000"),
        (["generate", "hi", "-m", "/no/such/dir"], "no such directory"),
        (["chat", "-m", "{model}", "--min-p", "3"], "min_p"),
        (["info", "/no/such/dir"], "no such directory"),
    ],
)
def test_errors_are_one_line_with_a_non_zero_exit(capsys, model_dir, argv, message):
    rc, out, err = cli(capsys, *[a.replace("{model}", model_dir) for a in argv])
    assert rc == 1 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("gptq-bridge: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_debug_shows_the_exception(model_dir):
    with pytest.raises(GPTQBridgeError, match="top_p"):
        main(["--debug", "generate", "hi", "-m", model_dir, "--top-p", "2"])


# --- chat over piped lines ------------------------------------------------------------------------------------


def test_chat_keeps_history_and_resets(capsys, monkeypatch, model_dir, lm):
    lines = "the a\nof to\n/reset\nthe a\n/nonsense\n/exit\nnever read\n"
    rc, out, err = cli(
        capsys, "chat", "-m", model_dir, "--max-new-tokens", "6", "--ban-eos", stdin=lines, monkeypatch=monkeypatch
    )
    assert rc == 0
    kw = dict(max_new_tokens=6, ban_eos=True)
    a1 = lm.generate(user("the a"), **kw).text
    a2 = lm.generate(user("the a") + [{"role": "assistant", "content": a1}] + user("of to"), **kw).text
    assert out.splitlines() == [a1, a2, a1]  # the third answer knows nothing of the first two
    assert a2 != lm.generate(user("of to"), **kw).text  # so the second one really saw the history
    assert "(conversation reset)" in err and "unknown command '/nonsense'" in err


def test_chat_drops_the_oldest_exchanges_when_the_context_is_full(capsys, monkeypatch, model_dir):
    lines = "".join(f"{' '.join(['the a of'] * 3)}\n" for _ in range(6))  # 9 tokens a question
    rc, out, err = cli(
        capsys,
        "chat",
        "-m",
        model_dir,
        "--max-new-tokens",
        "6",
        "--ban-eos",
        "-q",
        "--context-length",
        "40",
        stdin=lines,
        monkeypatch=monkeypatch,
    )
    assert rc == 0 and len(out.splitlines()) == 6
    assert "oldest messages are left out" in err
    assert "tokens were left out" not in err  # whole exchanges went, the prompt itself was never cut


def test_chat_with_a_system_message_ends_at_end_of_input(capsys, monkeypatch, model_dir, lm):
    rc, out, _ = cli(
        capsys,
        "chat",
        "-m",
        model_dir,
        "--max-new-tokens",
        "4",
        "--system",
        "of of",
        "-q",
        "--prompt-format",
        "chatml",
        stdin="the\n",
        monkeypatch=monkeypatch,
    )
    expected = lm.generate(
        [{"role": "system", "content": "of of"}] + user("the"), max_new_tokens=4, prompt_format="chatml"
    )
    assert rc == 0 and out == expected.text + "\n"


# --- chat in a terminal ---------------------------------------------------------------------------------------


class Terminal:
    def __init__(self, argv):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: run the command with the pty as its controlling terminal
            env = dict(os.environ, TERM="dumb", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a terminal's shell starts it (see conftest)
            os.execve(sys.executable, [sys.executable, "-m", "gptq_bridge.cli", *argv], env)
        self.seen = ""

    def read_until(self, pattern: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"waited for {pattern!r}; the terminal shows:\n{self.seen}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # the child exited
                    data = b""
                if not data:
                    raise AssertionError(f"the program ended while waiting for {pattern!r}:\n{self.seen}")
                self.seen += data.decode("utf-8", "replace")
        return self.seen

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.2)[0]:
                    self.seen += os.read(self.fd, 4096).decode("utf-8", "replace")
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"the program did not exit:\n{self.seen}")


def test_chat_in_a_terminal_ctrl_c_stops_the_answer_not_the_program(model_dir):
    term = Terminal(["chat", "-m", model_dir, "--max-new-tokens", "200", "--ban-eos", "-q"])
    try:
        term.read_until(r"/reset forgets")
        term.read_until(r"> $")
        time.sleep(2)  # let input() reach its wait: a signal just before it is only seen at the next key
        term.send("\x03")  # Ctrl-C at the prompt: a fresh prompt
        term.read_until(r"> \s*\r?\n> $")
        mark = len(term.seen)
        term.send("the a of\n")
        term.read_until(r"the a of\r?\n\S")  # the answer has begun
        term.send("\x03")  # Ctrl-C while it is written
        term.read_until(r"\(answer stopped\)")
        term.read_until(r"> $")
        answer = term.seen[mark:]
        assert len(answer.split()) < 200  # cut short
        mark = len(term.seen)
        term.send("of to\n")  # the program still answers, and Ctrl-C works again
        term.read_until(r"of to\r?\n\S")
        term.send("\x03")
        term.read_until(r"\(answer stopped\)[\s\S]*> $")
        assert term.seen[mark:].count("(answer stopped)") == 1
        term.send("/exit\n")
        assert term.wait() == 0
    finally:
        try:
            os.kill(term.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(term.pid, 0)
        except ChildProcessError:
            pass
        os.close(term.fd)


def test_ctrl_c_stops_generate_with_the_text_so_far(model_dir):
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptq_bridge.cli",
            "generate",
            "the a",
            "-m",
            model_dir,
            "--max-new-tokens",
            "200",
            "--ban-eos",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=default_sigint,
    )
    try:
        first = proc.stdout.read(1)  # the answer has begun
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "finish: cancelled" in err.decode() and "Traceback" not in err.decode()
    assert 0 < len((first + out).split()) < 200


# --- info -------------------------------------------------------------------------------------------------------


def loaded_bytes(lm) -> int:
    """What a loaded model holds: parameters and persistent buffers, plus everything kernels hold."""
    from gptq_bridge.kernels.base import GPTQLinear

    tensors = {}
    for module in lm.model.modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, t in own:
            if isinstance(module, GPTQLinear) or name not in module._non_persistent_buffers_set:
                tensors[id(t)] = t
    # `info` counts one group index per projection; projections fused for the engine (fusion.py) share one
    from gptq_bridge.fusion import FusedLinear

    shared = sum((len(m.widths) - 1) * m.linear.g_idx.nbytes for m in lm.model.modules() if isinstance(m, FusedLinear))
    return sum(t.numel() * t.element_size() for t in tensors.values()) + shared


def test_info(capsys, ckpt, model_dir, lm):
    from gptq_bridge.explain import explain

    rc, out, _ = cli(capsys, "info", model_dir, "--json")
    info = json.loads(out)
    assert rc == 0
    assert info["parameters"] == sum(p.numel() for p in ckpt.reference.parameters())
    chosen = explain(model_dir).chosen
    assert info["kernel"] == chosen == lm.kernel
    assert info["prompt_format"] == "plain" and info["context_length"] == 256
    assert info["quantization"] == "4-bit, group 32, no act-order, sym, v1 zeros"
    # 2 layers x 2 kv heads x 40 head dim x (k and v) x 4 bytes
    assert info["kv_cache_bytes_per_token"] == 2 * 2 * 40 * 2 * 4
    # the weights as the chosen kernel holds them once prepared: what the loaded model really holds
    assert info["weights_bytes"] == loaded_bytes(lm)
    rc, out, _ = cli(capsys, "info", model_dir)
    assert rc == 0
    assert re.search(rf"^kernel: +{re.escape(chosen)} on cpu", out, re.M)
    assert re.search(r"^prompt format: +plain", out, re.M)
    assert re.search(r"^generation: +decode engine", out, re.M) and info["generation"].startswith("decode engine")
    assert re.search(rf"^parameters: +{info['parameters']:,}$", out, re.M)
    assert re.search(r"^memory: +weights [\d.]+ [KMG]iB \+ KV cache [\d.]+ KiB/token", out, re.M)


def test_info_for_the_reference_kernel(capsys, model_dir):
    rc, out, _ = cli(capsys, "info", model_dir, "--kernel", "torch", "--json")
    info = json.loads(out)
    lm = gptq_bridge.load_model(model_dir, kernel="torch")
    assert rc == 0 and info["kernel"] == "torch" and info["weights_bytes"] == loaded_bytes(lm)


def test_info_shows_the_format_a_model_name_implies(capsys, model_dir, tmp_path):
    hermes = tmp_path / "Nous-Hermes-Llama2-70B-GPTQ"
    shutil.copytree(model_dir, hermes)
    rc, out, _ = cli(capsys, "info", str(hermes))
    assert rc == 0 and re.search(r"^prompt format: +alpaca +\(the model name", out, re.M)
    rc, out, _ = cli(capsys, "info", str(hermes), "--prompt-format", "chatml", "--json")
    assert json.loads(out)["prompt_format"] == "chatml"
