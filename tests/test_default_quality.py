"""The quality gate of the embedded default model: the prepared checkpoint against the unquantized model it was
made from, at 1 and 2 torch threads.

- tests/data/questions.json: short factual and chat questions with their accepted answers (none of it is
  calibration text). The prepared model must answer right at least 95% as many as the unquantized model, and
  keep at least 85% of the unquantized model's right answers. The float32 reference is measured once (at 2
  threads); the prepared model at 1 and at 2 threads.
- tests/data/heldout_text.txt: prose written for this test (not calibration text); the prepared model's
  perplexity on it must stay within 1.10x the unquantized model's.

A 135M model decides many answers by a hair, so the rates are over the whole set, and the test reports how many
answers changed where the unquantized model's margin was small (a near-tie) and where it was not.
"""

from pathlib import Path

import pytest
import torch

import gptq_bridge
from gptq_bridge import default_model as dm
from gptq_bridge.quality import agreement, greedy_answers, load_questions, perplexity
from gptq_bridge.quantize import load_source

DATA = Path(__file__).parent / "data"
MIN_CORRECT_RATIO = 0.95
MIN_AGREEMENT = 0.85
MAX_PERPLEXITY_RATIO = 1.10
NEAR_TIE = 0.5  # logits


@pytest.fixture(scope="module")
def float_model():
    model, tokenizer, _ = load_source(dm.find_gguf())
    return model.eval(), tokenizer


def test_prepared_model_keeps_the_float_models_answers_and_perplexity(default_model, float_model, quality_report):
    fm, ftok = float_model
    lm = gptq_bridge.load_model(str(default_model), device="cpu")
    questions = load_questions(DATA / "questions.json")
    text = (DATA / "heldout_text.txt").read_text(encoding="utf-8")
    assert len(questions) >= 40
    before = torch.get_num_threads()
    replies = {}
    failures = []
    try:
        torch.set_num_threads(2)  # the reference: float32, whose answers do not hang on the thread count
        ref = greedy_answers(fm, ftok, questions)
        ppl_ref = perplexity(fm, ftok, text)
        ties = {i for i, r in enumerate(ref) if r.margin < NEAR_TIE}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = greedy_answers(lm.model, lm.tokenizer, questions)
            replies[threads] = [a.reply for a in got]
            a = agreement(ref, got)
            ppl_got = perplexity(lm.model, lm.tokenizer, text)
            changed = {i for i, (r, g) in enumerate(zip(ref, got)) if r.reply != g.reply}
            quality_report.append(
                f"{threads} thread(s): right {a.candidate_correct}/{a.questions} against the float model's "
                f"{a.reference_correct} ({a.correct_ratio:.3f}x, gate {MIN_CORRECT_RATIO}); kept {a.kept}/"
                f"{a.reference_correct} of its right answers ({a.agreement:.3f}, gate {MIN_AGREEMENT}; lost {a.lost}, "
                f"gained {a.gained}); held-out perplexity {ppl_got:.2f} against {ppl_ref:.2f} "
                f"({ppl_got / ppl_ref:.3f}x, gate {MAX_PERPLEXITY_RATIO}); replies changed: "
                f"{len(changed & ties)}/{len(ties)} near-ties (float margin < {NEAR_TIE}), "
                f"{len(changed - ties)}/{len(ref) - len(ties)} others"
            )
            if (
                a.correct_ratio < MIN_CORRECT_RATIO
                or a.agreement < MIN_AGREEMENT
                or ppl_got > MAX_PERPLEXITY_RATIO * ppl_ref
            ):
                failures.append(quality_report[-1])
    finally:
        torch.set_num_threads(before)
    flips = sum(x != y for x, y in zip(replies[1], replies[2]))
    quality_report.append(f"prepared model: {flips}/{len(questions)} replies differ between 1 and 2 threads")
    assert not failures, failures


def test_question_set_and_heldout_text_are_not_calibration_text():
    from gptq_bridge.quality import answer_found

    calibration = " ".join((dm.DATA / name).read_text(encoding="utf-8") for name in dm.CALIBRATION_FILES).lower()
    for question in load_questions(DATA / "questions.json"):
        assert question.text.lower() not in calibration, question
    for paragraph in (DATA / "heldout_text.txt").read_text(encoding="utf-8").split("\n\n"):
        words = paragraph.lower().split()
        for k in range(0, len(words) - 11, 6):  # no run of 12 words in common
            assert " ".join(words[k : k + 12]) not in calibration, paragraph[:80]
    assert answer_found("It is Tokyo.", ["Tokyo"]) and not answer_found("about 129.77 km", ["7"])
