"""Tiny real models for the generation tests: GPTQ checkpoints (tests/tiny_checkpoints.py) with a word-level
or a byte-level BPE tokenizer, and a way to control the logits a loaded model produces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_checkpoints import build, llama_config
from torch import nn
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices on 2 shared cores: one thread is many times faster than two fighting other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BYTE_VOCAB = 320


def byte_level_tokenizer(chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE: characters outside its small training text are split into byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the cat sat on the mat. a dog ran to the park."] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"]
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def word_checkpoint(out: Path, seed: int = 0) -> Path:
    return build(out, tokenizer=True, seed=seed).path


def byte_checkpoint(out: Path, chat_template: str | None = CHATML_TEMPLATE) -> Path:
    path = build(out, hf_config=llama_config(vocab=BYTE_VOCAB)).path
    byte_level_tokenizer(chat_template).save_pretrained(str(path))
    return path


class ScriptedHead(nn.Module):
    """An output head with controlled logits: call k (the prefill, then one per new token) makes
    `script[k]` the most likely token; the others follow a fixed descending order, so the runner-up
    is known (token 0 > 1 > 2 ... apart from the scripted one)."""

    def __init__(self, script: list[int], vocab: int, margin: float = 30.0):
        super().__init__()
        self.script, self.vocab, self.margin = list(script), vocab, margin
        self.calls = 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, s, _ = hidden.shape
        logits = -0.01 * torch.arange(self.vocab, dtype=torch.float32).expand(b, s, self.vocab).clone()
        token = self.script[min(self.calls, len(self.script) - 1)]
        logits[..., token] = self.margin
        self.calls += 1
        return logits.to(hidden.dtype)


class FixedHead(nn.Module):
    """An output head that gives the same logits at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits.float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, s, _ = hidden.shape
        return self.logits.expand(b, s, -1).clone().to(hidden.dtype)


def set_head(lm, head: nn.Module):
    lm.model.lm_head = head
    return head
