"""text-generation-webui extension, driven as the webui drives it: both call signatures, the real state shape.

The webui itself cannot be installed in CI (it is not a package), so `modules.shared` here is a stand-in
holding just the attributes the webui reads and writes; docs/adapters/textgen.md records the run against a
real webui checkout.
"""

import sys
import threading
import types

import pytest
from adapter_models import adapter_source

from gptq_bridge import cli
from gptq_bridge.adapters import textgen
from gptq_bridge.default_model import NAME
from gptq_bridge.errors import GPTQBridgeError
from gptq_bridge.model_cache import shared_models

pytestmark = pytest.mark.usefixtures("default_model")

# The generation state the webui passes (keys from its modules/shared.py settings and modules/presets.py)
WEBUI_STATE = {
    "max_new_tokens": 12,
    "auto_max_new_tokens": False,
    "max_tokens_second": 0,
    "truncation_length": 2048,
    "temperature": 1,
    "dynatemp_low": 1,
    "dynatemp_high": 1,
    "dynatemp_exponent": 1,
    "smoothing_factor": 0,
    "smoothing_curve": 1,
    "top_p": 1,
    "top_k": 0,
    "min_p": 0,
    "top_n_sigma": 0,
    "typical_p": 1,
    "xtc_threshold": 0.1,
    "xtc_probability": 0,
    "epsilon_cutoff": 0,
    "eta_cutoff": 0,
    "tfs": 1,
    "top_a": 0,
    "dry_multiplier": 0,
    "dry_allowed_length": 2,
    "dry_base": 1.75,
    "repetition_penalty": 1,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "encoder_repetition_penalty": 1,
    "no_repeat_ngram_size": 0,
    "repetition_penalty_range": 1024,
    "penalty_alpha": 0,
    "guidance_scale": 1,
    "mirostat_mode": 0,
    "mirostat_tau": 5,
    "mirostat_eta": 0.1,
    "do_sample": False,
    "dynamic_temperature": False,
    "temperature_last": False,
    "sampler_priority": "repetition_penalty\ntemperature\ntop_k\ntop_p",
    "dry_sequence_breakers": '"\\n", ":", "\\"", "*"',
    "seed": -1,
    "ban_eos_token": True,
    "add_bos_token": True,
    "skip_special_tokens": True,
    "custom_stopping_strings": "",
    "custom_token_bans": "",
    "stream": True,
    "negative_prompt": "",
    "grammar_string": "",
    "static_cache": False,
}


@pytest.fixture
def webui(monkeypatch):
    shared = types.SimpleNamespace(model=None, tokenizer=None, model_name="None", stop_everything=False)
    modules = types.ModuleType("modules")
    modules.shared = shared
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    monkeypatch.setitem(textgen.params, "model", adapter_source())
    monkeypatch.setitem(textgen.params, "device", "cpu")
    textgen.setup()
    return shared


def state(**changes):
    return {**WEBUI_STATE, **changes}


def test_setup_gives_the_webui_a_model_and_a_real_tokenizer(webui):
    from transformers import PreTrainedTokenizerBase

    loaded = shared_models().get(adapter_source(), device="cpu")
    assert webui.model is loaded.model and isinstance(webui.tokenizer, PreTrainedTokenizerBase)
    assert webui.model_name == NAME


def test_both_signatures_yield_the_same_cumulative_reply(webui):
    new = list(textgen.custom_generate_reply("the cat", "the cat", state(), [], is_chat=False))
    old = list(textgen.custom_generate_reply("the cat", "the cat", -1, state(), [], is_chat=False))
    kw = list(textgen.custom_generate_reply("the cat", "the cat", state=state(), stopping_strings=[]))
    assert new == old == kw
    assert len(new) >= 3 and all(b.startswith(a) for a, b in zip(new, new[1:]))  # cumulative, not deltas
    greedy = (
        shared_models()
        .get(adapter_source(), device="cpu")
        .generate("the cat", max_new_tokens=12, ban_eos=True, add_bos=True)
    )  # the webui's add_bos_token is on
    assert new[-1] == greedy.text


def test_stop_strings_from_ui_string_and_api_list(webui):
    full = list(textgen.custom_generate_reply("the", "the", state(), []))[-1]
    stop = full[2:4]
    cut = full[: full.index(stop)]
    ui_form = '"' + stop.replace("\\", "\\\\").replace('"', '\\"') + '", "###"'
    assert list(textgen.custom_generate_reply("the", "the", state(custom_stopping_strings=ui_form), []))[-1] == cut
    assert list(textgen.custom_generate_reply("the", "the", state(custom_stopping_strings=[stop]), []))[-1] == cut
    assert list(textgen.custom_generate_reply("the", "the", state(), [stop]))[-1] == cut
    assert all(stop not in r for r in textgen.custom_generate_reply("the", "the", state(), [stop]))


def test_state_mapping():
    kw = textgen.state_to_kwargs(
        state(
            seed=7,
            temperature=0.7,
            do_sample=True,
            top_k=40,
            custom_token_bans="5, 9",
            auto_max_new_tokens=True,
            truncation_length=100,
            ban_eos_token=False,
        ),
        ["\n"],
        prompt_tokens=30,
    )
    assert kw["seed"] == 7 and kw["temperature"] == 0.7 and kw["top_k"] == 40
    assert kw["banned_token_ids"] == [5, 9] and kw["ban_eos"] is False and kw["stop"] == ["\n"]
    assert kw["max_new_tokens"] == 70 and kw["context_length"] == 100  # auto: what the context leaves
    assert kw["repetition_penalty_range"] == 1024
    assert textgen.state_to_kwargs(state(), None, 0)["seed"] is None  # -1 = random
    assert textgen.state_to_kwargs(state(do_sample=False, temperature=1.5), None, 0)["temperature"] == 0.0


def test_bad_state_values_are_clear_errors():
    with pytest.raises(GPTQBridgeError, match="custom_stopping_strings"):
        textgen.state_to_kwargs(state(custom_stopping_strings='"unclosed'), None, 0)
    with pytest.raises(GPTQBridgeError, match="custom_token_bans"):
        textgen.state_to_kwargs(state(custom_token_bans="a,b"), None, 0)


def test_prompt_format_param_adds_its_stop_strings(webui, monkeypatch):
    monkeypatch.setitem(textgen.params, "prompt_format", "alpaca")
    assert "### Instruction:" in textgen.state_to_kwargs(state(), None, 0)["stop"]
    monkeypatch.setitem(textgen.params, "prompt_format", "nope")
    with pytest.raises(GPTQBridgeError, match="prompt_format 'nope' is not registered"):
        textgen.state_to_kwargs(state(), None, 0)


def test_not_streaming_yields_only_the_final_reply(webui):
    replies = list(textgen.custom_generate_reply("the cat", "the cat", state(stream=False), []))
    assert len(replies) == 1 and replies[0]


def test_stop_button_and_stop_event_end_generation(webui):
    replies = []
    for reply in textgen.custom_generate_reply("the", "the", state(max_new_tokens=200), []):
        replies.append(reply)
        if len(replies) == 3:
            webui.stop_everything = True
    webui.stop_everything = False
    assert 3 <= len(replies) < 10
    event = threading.Event()
    replies = []
    for reply in textgen.custom_generate_reply("the", "the", state(max_new_tokens=200, stop_event=event), []):
        replies.append(reply)
        event.set()
    assert len(replies) < 5


def test_webui_stops_iterating_and_the_model_stays_usable(webui):
    gen = textgen.custom_generate_reply("the", "the", state(max_new_tokens=200), [])
    next(gen), next(gen)
    gen.close()  # what the webui does when it breaks out of its loop
    assert list(textgen.custom_generate_reply("the cat", "the cat", state(), []))[-1]


def test_custom_tokenized_length_uses_the_real_tokenizer(webui):
    assert textgen.custom_tokenized_length("the cat sat") == len(
        webui.tokenizer.encode("the cat sat", add_special_tokens=False)
    )


def test_install_into_a_webui_checkout(tmp_path, capsys):
    for layout in ("old", "new"):
        root = tmp_path / layout
        (root / "modules").mkdir(parents=True)
        (root / "server.py").write_text("")
        if layout == "new":
            (root / "user_data").mkdir()
        assert cli.main(["textgen", "install", str(root)]) == 0
        folder = root / ("user_data/extensions" if layout == "new" else "extensions") / "gptq_bridge"
        script = (folder / "script.py").read_text()
        assert "custom_generate_reply" in script and "setup" in script
        ns = {}
        exec(compile(script, str(folder / "script.py"), "exec"), ns)  # the installed script imports cleanly
        assert ns["params"] is textgen.params
    assert cli.main(["textgen", "install", str(tmp_path / "nowhere")]) == 1
    assert "not a text-generation-webui checkout" in capsys.readouterr().err


def test_split_settings_load_the_model_split_across_devices(webui, monkeypatch):
    monkeypatch.setitem(textgen.params, "device", "")
    monkeypatch.setitem(textgen.params, "max_memory", "cpu=4GiB")
    assert textgen.split_settings() == {"max_memory": "cpu=4GiB"}
    textgen.setup()
    loaded = shared_models().get(adapter_source(), max_memory="cpu=4GiB")
    assert webui.model is loaded.model and loaded.placement is not None
    assert loaded.placement.devices == ["cpu"] and loaded.placement.slots[0].layers[1] > 0
    new = list(textgen.custom_generate_reply("the cat", "the cat", state(), [], is_chat=False))
    assert new[-1] == loaded.generate("the cat", max_new_tokens=12, ban_eos=True, add_bos=True).text
    monkeypatch.setitem(textgen.params, "max_memory", "")
    monkeypatch.setitem(textgen.params, "gpu_split", "auto")
    assert textgen.split_settings() == {"device_map": "auto"}
