"""How close a quantized model stays to its unquantized original: greedy answers, their margins, perplexity.

A small model's greedy answer often hangs on a near-tie, where a rounding difference between two CPUs picks
the other token. So an answer is reported with its margin: the smallest gap between the best and the
second-best logit over the steps that lead to the expected answer. Comparisons are made over a question set
and a held-out text, never on one answer.

Both models are driven the same way: the tokenizer's chat template, questions batched with left padding,
greedy decoding with transformers' `generate`, so the float model and a GPTQ model loaded by gptq-bridge
(its `model` attribute) are measured alike.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import GPTQBridgeError


@dataclass(frozen=True)
class Question:
    text: str
    answers: tuple[str, ...]  # any of these, as a whole word or phrase, makes the reply right


@dataclass(frozen=True)
class Answer:
    reply: str
    correct: bool
    margin: float  # smallest top-1 minus top-2 logit gap up to the step that completes the expected answer
    finished: bool  # ended with an end-of-sequence token within the token budget


def load_questions(path: str | Path) -> list[Question]:
    """A JSON list of {"q": question, "a": [accepted answers]}; errors name the file and the entry."""
    path = Path(path)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GPTQBridgeError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(items, list) or not items:
        raise GPTQBridgeError(f"{path}: expected a non-empty JSON list of questions")
    questions = []
    for i, item in enumerate(items):
        q, a = (item.get("q"), item.get("a")) if isinstance(item, dict) else (None, None)
        if (
            not isinstance(q, str)
            or not q.strip()
            or not isinstance(a, list)
            or not a
            or not all(isinstance(x, str) and x.strip() for x in a)
        ):
            raise GPTQBridgeError(f'{path}: entry {i} must be {{"q": question, "a": [answers]}}, got {item!r}')
        questions.append(Question(q, tuple(a)))
    return questions


def answer_found(reply: str, answers: Sequence[str]) -> bool:
    """True when one of `answers` stands in `reply` as a word or phrase of its own (any case).

    "7" is not found in "129.77" and "A" not in "alphabet": neither letters, digits nor a decimal point may
    touch it.
    """
    return any(re.search(r"(?<![\w.\-])" + re.escape(a) + r"(?!\w|[.,]\d)", reply, re.IGNORECASE) for a in answers)


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if isinstance(i, int))


@torch.inference_mode()
def greedy_answers(
    model, tokenizer, questions: Sequence[Question], *, max_new_tokens: int = 32, batch_size: int = 128
) -> list[Answer]:
    """Each question's greedy reply through the chat template, checked against its accepted answers."""
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    out: list[Answer] = []
    try:
        for start in range(0, len(questions), batch_size):
            batch = questions[start : start + batch_size]
            enc = tokenizer(
                [chat_prompt(tokenizer, q.text) for q in batch],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=pad,
                eos_token_id=eos,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            top2 = torch.stack(gen.logits, 1).float().topk(2, dim=-1).values
            gaps = (top2[..., 0] - top2[..., 1]).cpu()
            new = gen.sequences[:, enc["input_ids"].shape[1] :].cpu()
            for i, q in enumerate(batch):
                ids = new[i].tolist()
                ends = [k for k, t in enumerate(ids) if t in eos]
                finished = bool(ends)
                ids = ids[: ends[0] + 1] if ends else ids
                reply = tokenizer.decode(ids, skip_special_tokens=True)
                correct = answer_found(reply, q.answers)
                decisive = len(ids)
                if correct:  # the first step at which the reply so far holds the answer
                    decisive = next(
                        k
                        for k in range(1, len(ids) + 1)
                        if answer_found(tokenizer.decode(ids[:k], skip_special_tokens=True), q.answers)
                    )
                margin = float(gaps[i, :decisive].min()) if decisive else 0.0
                out.append(Answer(reply=reply.strip(), correct=correct, margin=margin, finished=finished))
    finally:
        tokenizer.padding_side = side
    return out


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, *, seq_len: int = 512, max_windows: int | None = None) -> float:
    """exp(mean next-token loss) over non-overlapping windows of `seq_len` tokens of `text`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = len(ids) // seq_len if max_windows is None else min(max_windows, len(ids) // seq_len)
    if windows < 1:
        raise GPTQBridgeError(f"perplexity: the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    device = next(model.parameters()).device
    total = 0.0
    for k in range(windows):
        x = torch.tensor([ids[k * seq_len : (k + 1) * seq_len]], device=device)
        logits = model(input_ids=x).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
    return math.exp(total / (windows * (seq_len - 1)))


@dataclass(frozen=True)
class Agreement:
    """A candidate's answers against the reference's, over one question set."""

    questions: int
    reference_correct: int
    candidate_correct: int
    kept: int  # reference-correct questions that the candidate answers right too
    lost: int  # reference-correct questions the candidate gets wrong
    gained: int  # reference-wrong questions the candidate gets right
    identical: int  # replies word for word the same

    @property
    def correct_ratio(self) -> float:
        return self.candidate_correct / max(self.reference_correct, 1)

    @property
    def agreement(self) -> float:
        return self.kept / max(self.reference_correct, 1)


def agreement(reference: Sequence[Answer], candidate: Sequence[Answer]) -> Agreement:
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference answers against {len(candidate)} candidate answers")
    pairs = list(zip(reference, candidate))
    return Agreement(
        questions=len(pairs),
        reference_correct=sum(r.correct for r, _ in pairs),
        candidate_correct=sum(c.correct for _, c in pairs),
        kept=sum(r.correct and c.correct for r, c in pairs),
        lost=sum(r.correct and not c.correct for r, c in pairs),
        gained=sum(c.correct and not r.correct for r, c in pairs),
        identical=sum(r.reply == c.reply for r, c in pairs),
    )
