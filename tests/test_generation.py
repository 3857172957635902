"""The generator on real tiny GPTQ models: KV cache, finish reasons, stop strings, UTF-8, seeds, truncation,
cancellation and concurrency. Where a test needs known tokens, the model's output head is replaced by one with
controlled logits (gen_models.ScriptedHead); the rest of the model runs as loaded.

Every test runs twice: through the decode engine (engine="auto", these are Llama models) and through
transformers' forward (engine="off"), so both generators keep the same behaviour."""

import shutil
import threading

import pytest
import torch
from gen_models import (
    BYTE_VOCAB,
    ScriptedHead,
    byte_checkpoint,
    byte_level_tokenizer,
    one_thread,  # noqa: F401  (autouse fixture)
    set_head,
    word_checkpoint,
)
from transformers import AutoTokenizer

import gptq_bridge
from gptq_bridge.errors import GPTQBridgeError
from gptq_bridge.generation import IncrementalDecoder, backend_decoder, prepare
from gptq_bridge.stream import make_request


@pytest.fixture(scope="module", params=["auto", "off"])
def engine(request):
    return request.param


@pytest.fixture(scope="module")
def load(engine):
    return lambda path, **kw: gptq_bridge.load_model(str(path), engine=engine, **kw)


@pytest.fixture(scope="module")
def word_path(tmp_path_factory):
    return word_checkpoint(tmp_path_factory.mktemp("gen") / "word")


@pytest.fixture(scope="module")
def lm(word_path, load):
    """Shared by the tests that leave the model as it is."""
    return load(word_path)


@pytest.fixture
def fresh(word_path, load):
    """A model of its own, for tests that change its output head."""
    return load(word_path)


@pytest.fixture(scope="module")
def byte_path(tmp_path_factory):
    return byte_checkpoint(tmp_path_factory.mktemp("gen") / "byte")


def ids(lm, text):
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


# --- the decode loop ------------------------------------------------------------------------------------


def test_greedy_with_the_kv_cache_matches_full_forwards(lm):
    result = lm.generate("the a of to", max_new_tokens=8, ban_eos=True)
    assert result.finish_reason == "length" and result.usage.completion_tokens == 8
    seq = ids(lm, "the a of to")
    with torch.no_grad():
        for token in result.token_ids:
            assert int(lm.model(torch.tensor([seq])).logits[0, -1].argmax()) == token
            seq.append(token)
    assert result.text == lm.tokenizer.decode(result.token_ids)
    assert result.usage.prompt_tokens == 4


def test_a_prompt_prefilled_in_chunks_gives_the_same_tokens(lm, monkeypatch):
    prompt = " ".join(["the", "a", "of", "to", "and"] * 4)
    whole = lm.generate(prompt, max_new_tokens=6, ban_eos=True)
    monkeypatch.setattr("gptq_bridge.generation.PREFILL_CHUNK", 3)
    assert lm.generate(prompt, max_new_tokens=6, ban_eos=True).token_ids == whole.token_ids


def test_chunks_add_up_to_the_result(lm):
    stream = lm.stream("the a of", max_new_tokens=10, ban_eos=True, temperature=1.0, seed=5)
    chunks = list(stream)
    assert "".join(c.text for c in chunks) == stream.result.text
    assert chunks[-1].full_text == stream.result.text
    assert all(c.full_text.endswith(c.text) for c in chunks)
    assert sum(len(c.token_ids) for c in chunks) == len(stream.result.token_ids) == 10


def test_same_seed_same_output_other_seed_other_output(lm):
    kw = dict(max_new_tokens=16, temperature=1.5, ban_eos=True)
    a = lm.generate("the a", seed=11, **kw)
    assert a.seed == 11
    assert lm.generate("the a", seed=11, **kw).token_ids == a.token_ids
    assert lm.generate("the a", seed=12, **kw).token_ids != a.token_ids
    assert lm.generate("the a", **kw).seed is not None  # a random seed is drawn and reported


def test_banned_tokens_never_appear(lm):
    first = lm.generate("the a of", max_new_tokens=6, ban_eos=True).token_ids
    banned = sorted(set(first))
    result = lm.generate("the a of", max_new_tokens=6, ban_eos=True, banned_token_ids=banned)
    assert not set(result.token_ids) & set(banned)


def test_repetition_penalty_makes_a_repetitive_model_vary(lm):
    plain = lm.generate("the", max_new_tokens=20, ban_eos=True)
    penalised = lm.generate("the", max_new_tokens=20, ban_eos=True, repetition_penalty=5.0)
    assert len(set(plain.token_ids)) < len(set(penalised.token_ids))


# --- finish reasons, stop strings, EOS --------------------------------------------------------------


def test_eos_ends_generation_and_is_not_text(fresh):
    tok = fresh.tokenizer
    set_head(fresh, ScriptedHead([tok.convert_tokens_to_ids(w) for w in ["the", "a", "</s>", "of"]], 96))
    result = fresh.generate("to", max_new_tokens=10)
    assert result.finish_reason == "eos" and result.text == "the a"
    assert result.token_ids[-1] == tok.eos_token_id and result.usage.completion_tokens == 3


def test_ban_eos_goes_on_past_eos(fresh):
    tok = fresh.tokenizer
    set_head(fresh, ScriptedHead([tok.convert_tokens_to_ids(w) for w in ["the", "</s>", "</s>"]], 96))
    result = fresh.generate("to", max_new_tokens=3, ban_eos=True)
    assert result.finish_reason == "length" and tok.eos_token_id not in result.token_ids
    # the runner-up under the scripted head is token 0 (<unk>), then 1 (<s>): skipped as special tokens


def test_stop_string_across_tokens_is_held_back_and_cut(fresh):
    tok = fresh.tokenizer
    words = ["the", "a", "of", "to", "and"]
    set_head(fresh, ScriptedHead([tok.convert_tokens_to_ids(w) for w in words], 96))
    stream = fresh.stream("in", max_new_tokens=10, stop=["a of"])
    chunks = [c.text for c in stream]
    assert stream.result.finish_reason == "stop" and stream.result.stop_string == "a of"
    assert stream.result.text == "the "
    assert not any("a" in c for c in chunks)  # the 'a' of 'a of' was never shown
    assert stream.result.usage.completion_tokens == 3


def test_held_text_is_released_when_the_stop_does_not_complete(fresh):
    tok = fresh.tokenizer
    set_head(fresh, ScriptedHead([tok.convert_tokens_to_ids(w) for w in ["the", "a", "to"]], 96))
    result = fresh.generate("in", max_new_tokens=3, stop=["a of"])
    assert result.finish_reason == "length" and result.text == "the a to"


def test_special_token_stop_strings_match_as_tokens(byte_path, load):
    lm = load(byte_path)
    tok = lm.tokenizer
    script = ids(lm, "the cat") + [tok.convert_tokens_to_ids("<|im_end|>")] + ids(lm, " sat")
    set_head(lm, ScriptedHead(script, BYTE_VOCAB))
    # the tokenizer's chat template is chosen; the end of its turns (<|im_end|>, not the EOS) is an implied
    # stop, and a special token that skip_special_tokens hides from the text: it is matched as a token
    result = lm.generate([{"role": "user", "content": "hi"}], max_new_tokens=20)
    assert result.prompt_format == "tokenizer"
    assert result.finish_reason == "stop" and result.stop_string == "<|im_end|>" and result.text == "the cat"
    set_head(lm, ScriptedHead(script, BYTE_VOCAB))
    result = lm.generate("x", max_new_tokens=20, stop=["<|im_end|>"])
    assert result.finish_reason == "stop" and result.stop_string == "<|im_end|>" and result.text == "the cat"


def test_text_held_for_a_stop_string_is_released_when_a_stop_token_ends(byte_path, load):
    lm = load(byte_path)
    script = ids(lm, "the c") + [lm.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    set_head(lm, ScriptedHead(script, BYTE_VOCAB))
    result = lm.generate("x", max_new_tokens=20, stop=["c at", "<|im_end|>"])  # 'c' waits to see if 'c at' follows
    assert result.text == "the c" and result.stop_string == "<|im_end|>"


def test_keep_special_tokens(byte_path, load):
    lm = load(byte_path)
    start = lm.tokenizer.convert_tokens_to_ids("<|im_start|>")
    script = [start] + ids(lm, "cat")
    set_head(lm, ScriptedHead(script, BYTE_VOCAB))
    assert lm.generate("x", max_new_tokens=len(script)).text == "cat"
    set_head(lm, ScriptedHead(script, BYTE_VOCAB))
    assert lm.generate("x", max_new_tokens=len(script), skip_special_tokens=False).text == "<|im_start|>cat"


# --- UTF-8 ------------------------------------------------------------------------------------------------


TEXT = "é日🙂 the cat ✓"


def test_incremental_decoding_never_emits_half_a_character():
    tok = byte_level_tokenizer()
    token_ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(token_ids) > len(TEXT.split())  # characters really are split over byte tokens
    dec = IncrementalDecoder(tok)
    pieces = [dec.add(t) for t in token_ids] + [dec.flush()]
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens were only part of a character, and waited


@pytest.mark.parametrize("skip", [True, False])
def test_the_backend_decoder_gives_the_tokenizers_text(word_path, skip):
    """Incremental decoding calls the tokenizers library directly for a plain fast tokenizer: the same text."""
    tok = AutoTokenizer.from_pretrained(str(word_path))
    assert backend_decoder(tok) is not None
    gen = torch.Generator().manual_seed(0)
    specials = [i for i in (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) if i is not None]
    for _ in range(20):
        ids = torch.randint(0, len(tok), (30,), generator=gen).tolist() + specials
        text = tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        dec = IncrementalDecoder(tok, skip)
        assert "".join([dec.add(i) for i in ids] + [dec.flush()]) == text


def test_streamed_utf8_from_the_model(byte_path, load):
    lm = load(byte_path)
    script = ids(lm, TEXT)
    set_head(lm, ScriptedHead(script, BYTE_VOCAB))
    stream = lm.stream("the", max_new_tokens=len(script))
    chunks = [c.text for c in stream]
    assert "".join(chunks) == TEXT == stream.result.text
    assert not any("\ufffd" in c for c in chunks)


def test_a_stop_string_made_of_multibyte_characters(byte_path, load):
    lm = load(byte_path)
    script = ids(lm, TEXT)
    set_head(lm, ScriptedHead(script, BYTE_VOCAB))
    stream = lm.stream("the", max_new_tokens=len(script), stop=["🙂 the"])
    chunks = [c.text for c in stream]
    assert stream.result.text == "é日" and "".join(chunks) == "é日"


# --- prompts, BOS, truncation ---------------------------------------------------------------------------


def test_messages_use_the_models_format_and_its_stop_strings(word_path, tmp_path, load):
    hermes = tmp_path / "Nous-Hermes-Llama2-70B-GPTQ"
    shutil.copytree(word_path, hermes)
    lm = load(hermes)
    prep = prepare(lm, make_request([{"role": "user", "content": "the a"}], stop=["xyz"]))
    assert prep.prompt_format == "alpaca"
    assert prep.stops == ["xyz", "### Instruction:", "### Input:"]
    assert lm.tokenizer.decode(prep.ids) == lm.tokenizer.decode(ids(lm, "### Instruction:\nthe a\n\n### Response:\n"))
    # a prompt string is sent as it is: no format, no implied stops
    prep = prepare(lm, make_request("the a"))
    assert prep.prompt_format is None and prep.stops == []
    # the model's default format can be set, and a request can override it
    lm.prompt_format = "vicuna"
    assert prepare(lm, make_request([{"role": "user", "content": "a"}])).prompt_format == "vicuna"
    assert (
        prepare(lm, make_request([{"role": "user", "content": "a"}], prompt_format="chatml")).prompt_format == "chatml"
    )


def test_add_bos(lm):
    bos = lm.tokenizer.bos_token_id
    assert prepare(lm, make_request("the a")).ids[0] != bos  # this tokenizer adds none by itself
    assert prepare(lm, make_request("the a", add_bos=True)).ids[0] == bos
    assert lm.generate("the a", add_bos=True, max_new_tokens=1).usage.prompt_tokens == 3


def test_a_long_prompt_is_cut_from_the_left(lm):
    prompt = " ".join(["the", "a", "of", "to"] * 10)  # 40 tokens
    result = lm.generate(prompt, max_new_tokens=4, context_length=20, add_bos=True, ban_eos=True)
    assert result.usage.prompt_tokens == 16 and result.truncated_prompt_tokens == 41 - 16
    prep = prepare(lm, make_request(prompt, max_new_tokens=4, context_length=20, add_bos=True))
    assert prep.ids[0] == lm.tokenizer.bos_token_id  # BOS stays first
    assert prep.ids[1:] == ids(lm, prompt)[-15:]  # the end of the prompt is kept
    # the model's own context (256) applies without context_length
    assert lm.generate(" ".join(["the"] * 300), max_new_tokens=6).truncated_prompt_tokens == 300 - 250


def test_a_long_prompt_can_be_refused(lm):
    with pytest.raises(GPTQBridgeError, match="prompt: 40 tokens, but only 16 fit"):
        lm.generate(" ".join(["the"] * 40), max_new_tokens=4, context_length=20, truncate="error")
    with pytest.raises(GPTQBridgeError, match="max_new_tokens: 300"):
        lm.generate("the", max_new_tokens=300)


def test_the_default_max_new_tokens_fits_a_short_context(lm):
    assert prepare(lm, make_request("the")).max_new_tokens == 128  # 256 by default, half of this 256 context
    assert prepare(lm, make_request("the", max_new_tokens=200)).max_new_tokens == 200


def test_request_errors_name_the_parameter(lm):
    with pytest.raises(GPTQBridgeError, match="temperatur: unknown parameter"):
        lm.generate("the", temperatur=0.5)
    with pytest.raises(GPTQBridgeError, match="truncate"):
        lm.generate("the", truncate="right")
    with pytest.raises(GPTQBridgeError, match="banned_token_ids: 500"):
        lm.generate("the", banned_token_ids=[500])
    with pytest.raises(GPTQBridgeError, match="prompt_format: applies to messages"):
        lm.generate("the", prompt_format="alpaca")
    with pytest.raises(GPTQBridgeError, match="exactly one of prompt"):
        lm.generate()


def test_a_model_without_tokenizer_says_so(word_path, load):
    lm = load(word_path, load_tokenizer=False)
    with pytest.raises(GPTQBridgeError, match="ships no tokenizer"):
        lm.generate("the")


# --- cancellation and concurrency ------------------------------------------------------------------------


def test_cancel_from_another_thread_leaves_the_model_usable(lm):
    expected = lm.generate("the a", max_new_tokens=8, ban_eos=True)
    stream = lm.stream("the a", max_new_tokens=200, ban_eos=True)
    seen = []
    for chunk in stream:
        seen.append(chunk)
        if len(seen) == 2:
            threading.Thread(target=stream.cancel).start()
    assert stream.result.finish_reason == "cancelled"
    assert 2 <= stream.result.usage.completion_tokens < 200
    assert lm.generate("the a", max_new_tokens=8, ban_eos=True).token_ids == expected.token_ids


def test_a_cancel_event_passed_in(lm):
    event = threading.Event()
    event.set()
    result = lm.generate("the a", max_new_tokens=50, cancel=event)
    assert result.finish_reason == "cancelled" and result.usage.completion_tokens == 0


def test_abandoning_a_stream_frees_the_model(lm):
    for _ in lm.stream("the a", max_new_tokens=100, ban_eos=True):
        break
    done = []
    worker = threading.Thread(target=lambda: done.append(lm.generate("the", max_new_tokens=2)))
    worker.start()
    worker.join(timeout=30)
    assert done, "the abandoned stream still holds the model"


class WatchedLock:
    """A model's generation lock that tells when a thread finds it taken, then waits for it as usual."""

    def __init__(self, lock, on_taken):
        self.lock, self.on_taken = lock, on_taken

    def acquire(self, blocking=True, timeout=-1):
        if self.lock.acquire(blocking=False):
            return True
        self.on_taken()
        return self.lock.acquire(blocking, timeout)

    def release(self):
        self.lock.release()


def test_concurrent_calls_are_serialised(word_path):
    """Outside the decode engine, generations on one model take turns. Every forward of the model is logged with its thread. One generation is paused mid-stream while three
    more start in their own threads; each generation's forwards must be one unbroken run of the log. Rather
    than sleep, the paused one goes on once every other thread has run a forward or found the model taken."""
    fresh = gptq_bridge.load_model(str(word_path), engine="off")
    prompts = ("the", "of a", "to to")
    expected = {p: fresh.generate(p, max_new_tokens=6, ban_eos=True).token_ids for p in prompts}
    events = []  # (thread name, "forward" | "done" | "waits")
    changed = threading.Condition()

    def record(event):
        with changed:
            events.append((threading.current_thread().name, event))
            changed.notify_all()

    hooks = [
        fresh.model.register_forward_pre_hook(lambda *_: record("forward")),
        fresh.model.register_forward_hook(lambda *_: record("done")),
    ]
    fresh.generation_lock = WatchedLock(fresh.generation_lock, lambda: record("waits"))
    results = {}
    stream = fresh.stream("the a of", max_new_tokens=50, ban_eos=True)
    try:
        iterator = iter(stream)
        next(iterator)  # the first generation is under way and holds the model
        workers = [
            threading.Thread(
                target=lambda p=p: results.__setitem__(p, fresh.generate(p, max_new_tokens=6, ban_eos=True)),
                name=p,
                daemon=True,
            )
            for p in prompts
        ]
        for w in workers:
            w.start()
        with changed:
            assert changed.wait_for(lambda: {name for name, _ in events} >= set(prompts), timeout=30), (
                "the other calls neither ran the model nor waited for its generation_lock"
            )
        for _ in iterator:
            pass
        for w in workers:
            w.join(timeout=60)
    finally:
        stream.close()
        for h in hooks:
            h.remove()
    forwards = [name for name, event in events if event != "waits"]
    turns = [name for i, name in enumerate(forwards) if i == 0 or forwards[i - 1] != name]
    assert len(turns) == len(set(turns)), f"generations on one model overlapped; the model ran in turns {turns}"
    assert set(turns) == {threading.current_thread().name, *prompts}
    assert {p: r.token_ids for p, r in results.items()} == expected


def test_waiting_for_the_model_can_be_cancelled(word_path):
    lm = gptq_bridge.load_model(str(word_path), engine="off")  # the engine has no waiting for the model
    stream = lm.stream("the a", max_new_tokens=50, ban_eos=True)
    iterator = iter(stream)
    next(iterator)
    event = threading.Event()
    got = []
    worker = threading.Thread(target=lambda: got.append(lm.generate("the", cancel=event, max_new_tokens=3)))
    worker.start()
    event.set()
    worker.join(timeout=10)
    assert got and got[0].finish_reason == "cancelled"
    stream.close()
