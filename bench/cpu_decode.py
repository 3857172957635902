"""CPU speed of the embedded default model against llama.cpp reading the GGUF it is made from.

    python bench/cpu_decode.py --out bench/results/cpu-decode-DATE.json [--threads 1,2] [--reps 3]
                               [--kernel auto] [--head auto] [--no-peer]
    python bench/cpu_decode.py --kernel-costs   # the CPU numbers of gptq_bridge/kernels/measured.py

Both engines get the same work, each in a fresh process (so load time is measured from nothing):
- load: until the model can generate (gptq-bridge: `load_model()` of the prepared default; llama.cpp: `Llama()`);
- prefill: a 512-token prompt (held-out prose, the same token ids for both), timed to the first streamed token;
- decode: 128 greedy tokens after a short chat prompt, end-of-sequence banned, tokens/s from the first streamed
  token to the last (so the prompt is not counted).
Before the timed runs, one run builds the compiled stretch of gptq-bridge's CPU decode step (engine/cpu_compiled.py)
into the user cache if it is not there (what a first reply on a machine starts in the background); each timed run
waits after its warm-up until that package is loaded (a second or two after the first reply of a process).
llama.cpp is `llama-cpp-python`, an optional peer imported from the interpreter `--peer-python` names (default:
$LLAMACPP_PYTHON, else this one); it is never a dependency of gptq-bridge. Runs are interleaved (for each
repetition: each thread count, ours then the peer) so a machine shared with other work slows both alike; the
table gives medians over the repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "tests" / "data" / "heldout_text.txt"
CHAT = "Tell me about the history of the Roman Empire, from its founding to its fall."
PREFILL, NEW = 512, 128


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def prompt_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(PREFILL token ids of held-out prose, the chat prompt's ids): what both engines read."""
    text = HELDOUT.read_text(encoding="utf-8")
    long_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:PREFILL]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True)
    if isinstance(chat, dict) or hasattr(chat, "keys"):
        chat = chat["input_ids"]
    return list(long_ids), list(chat)


# --- workers: one engine, one thread count, in a process of their own -----------------------------------------


def read_ids(path: str) -> tuple[list[int], list[int]]:
    data = json.loads(Path(path).read_text())
    return data["prefill"], data["chat"]


def worker_ours(threads: int, ids: str, kernel: str, head: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    import gptq_bridge

    start = time.perf_counter()
    lm = gptq_bridge.load_model(device="cpu", kernel=kernel, **({} if head == "auto" else {"head": head}))
    load_s = time.perf_counter() - start
    long_ids, chat_ids = read_ids(ids)

    def timed(ids: list[int], new: int) -> tuple[float, list[float], int]:
        text = lm.tokenizer.decode(ids)
        t0, arrivals = time.perf_counter(), []
        stream = lm.stream(text, max_new_tokens=new, ban_eos=True, add_bos=False)
        for chunk in stream:
            arrivals += [time.perf_counter()] * len(chunk.token_ids)
        return t0, arrivals, stream.result.usage.prompt_tokens

    timed(chat_ids, 8)  # warm-up: first-call costs (engine thread, allocator) are not per-token costs
    step = cpu_step_status(lm, wait=True)  # the compiled stretch (cpu_compiled.py) loaded, as after a first reply
    t0, arrivals, n_prompt = timed(long_ids, 1)
    prefill_s = arrivals[0] - t0
    _, arrivals, _ = timed(chat_ids, NEW)
    assert len(arrivals) == NEW, len(arrivals)
    return dict(
        load_s=load_s,
        prefill_tok_s=n_prompt / prefill_s,
        prefill_tokens=n_prompt,
        decode_tok_s=(NEW - 1) / (arrivals[-1] - arrivals[0]),
        kernel=lm.kernel,
        cpu_step=step,
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
    )


def cpu_step_status(lm, wait: bool = False) -> str:
    """How the engine's CPU decode step runs: "compiled", "compiling", or "op by op" and why."""
    from gptq_bridge.engine.generator import engine_for

    steps = list(engine_for(lm).forward._cpu_steps.values())
    compiled = steps[0].compiled if steps else None
    if compiled is None:
        return "op by op"
    return compiled.wait(timeout=900) if wait else compiled.status


def worker_prepare(ids: str, kernel: str, head: str) -> dict:
    """Once before the timed runs: a first reply, which builds the compiled stretch of the CPU decode step
    (cpu_compiled.py) into the user cache if it is not there yet, and waits for it."""
    import gptq_bridge

    lm = gptq_bridge.load_model(device="cpu", kernel=kernel, **({} if head == "auto" else {"head": head}))
    start = time.perf_counter()
    lm.generate(lm.tokenizer.decode(read_ids(ids)[1]), max_new_tokens=2, add_bos=False)
    return dict(cpu_step=cpu_step_status(lm, wait=True), seconds=round(time.perf_counter() - start, 1))


def worker_peer(threads: int, ids: str, gguf: str) -> dict:
    import llama_cpp

    long_ids, chat_ids = read_ids(ids)
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=gguf, n_ctx=1024, n_batch=PREFILL, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    load_s = time.perf_counter() - start
    eos = llm.token_eos()

    def timed(ids: list[int], new: int) -> tuple[float, list[float]]:
        llm.reset()
        t0, arrivals = time.perf_counter(), []
        for chunk in llm.create_completion(
            ids, max_tokens=new, temperature=0.0, logit_bias={eos: float("-inf")}, stream=True
        ):
            choice = chunk["choices"][0]
            if choice["finish_reason"] is None or choice["text"]:  # the closing chunk carries no token
                arrivals.append(time.perf_counter())
        return t0, arrivals

    timed(chat_ids, 8)
    t0, arrivals = timed(long_ids, 1)
    prefill_s = arrivals[0] - t0
    _, arrivals = timed(chat_ids, NEW)
    assert len(arrivals) == NEW, len(arrivals)
    return dict(
        load_s=load_s,
        prefill_tok_s=PREFILL / prefill_s,
        decode_tok_s=(NEW - 1) / (arrivals[-1] - arrivals[0]),
        llama_cpp_python=llama_cpp.__version__,
    )


def kernel_costs(reps: int) -> dict:
    """Microseconds (thread CPU time, 1 thread, best of `reps`) of one decoder layer's seven Linears of the
    default model's shape (hidden 576, intermediate 1536; 4-bit, asymmetric groups of 32), fused as the engine
    runs them (q/k/v 576x960, o 576x576, gate/up 576x3072, down 1536x576), at 1 and 512 rows: the CPU entries of
    gptq_bridge/kernels/measured.py."""
    import torch

    from gptq_bridge.config import QuantizeConfig
    from gptq_bridge.kernels.cpu_int4 import CpuInt4Linear
    from gptq_bridge.kernels.torch_ref import TorchDenseLinear
    from gptq_bridge.packing import pack
    from gptq_bridge.types import LayerShape

    torch.set_num_threads(1)
    config = QuantizeConfig(bits=4, group_size=32, sym=False)
    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
    gen = torch.Generator().manual_seed(0)
    out: dict = {}
    for name, cls in (("torch-dense", TorchDenseLinear), ("cpu-int4", CpuInt4Linear)):
        layers = []
        for k, n in shapes:
            m = cls(LayerShape(name="l", in_features=k, out_features=n), config, torch.float32)
            m.qweight = pack(torch.randint(0, 16, (k, n), generator=gen), 4, 0)
            m.qzeros = pack(torch.randint(0, 15, (k // 32, n), generator=gen), 4, 1)
            m.scales = torch.rand(k // 32, n, generator=gen) / 100
            m.g_idx = torch.arange(k, dtype=torch.int32) // 32
            m.prepare()
            layers.append(m)
        for rows in (1, 512):
            xs = [torch.randn(rows, k, generator=gen) for k, _ in shapes]
            calls = 200 if rows == 1 else 3
            best = float("inf")
            with torch.inference_mode():
                for _ in range(reps):
                    start = time.thread_time()
                    for _ in range(calls):
                        for m, x in zip(layers, xs):
                            m(x)
                    best = min(best, (time.thread_time() - start) / calls * 1e6)
            out.setdefault(name, {})[f"(4, {rows})"] = round(best, 1)
    return out


# --- driver --------------------------------------------------------------------------------------------------


def run_worker(python: str, args: list[str], env: dict) -> dict | None:
    proc = subprocess.run(
        [python, __file__, "--worker", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900
    )
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--head", default="auto")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-python", default=os.environ.get("LLAMACPP_PYTHON", sys.executable))
    ap.add_argument("--kernel-costs", action="store_true", help="print the CPU costs for kernels/measured.py only")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kernel_costs:
        print(json.dumps(kernel_costs(args.reps), indent=1))
        return 0
    if args.worker:
        kind, threads, *rest = args.worker
        if kind == "prepare":
            result = worker_prepare(*rest)
        else:
            result = worker_ours(int(threads), *rest) if kind == "ours" else worker_peer(int(threads), *rest)
        print(json.dumps(result))
        return 0

    from gptq_bridge import default_model as dm

    gguf = str(dm.find_gguf())
    model_dir = dm.default_source()  # prepares the default model if needed (not part of any timing)
    from transformers import AutoTokenizer

    long_ids, chat_ids = prompt_ids(AutoTokenizer.from_pretrained(model_dir))
    ids = Path(tempfile.mkdtemp()) / "ids.json"
    ids.write_text(json.dumps({"prefill": long_ids, "chat": chat_ids}))
    threads = [int(t) for t in args.threads.split(",")]
    peer = not args.no_peer
    if peer and subprocess.run([args.peer_python, "-c", "import llama_cpp"], capture_output=True).returncode:
        print(f"llama_cpp is not importable from {args.peer_python}: running without the peer", file=sys.stderr)
        peer = False
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OMP_NUM_THREADS", None)
    runs: dict[str, dict[int, list[dict]]] = {
        "gptq-bridge": {t: [] for t in threads},
        "llama.cpp": {t: [] for t in threads},
    }
    prepared = run_worker(sys.executable, ["prepare", "0", str(ids), args.kernel, args.head], env)
    print(f"prepared: {json.dumps(prepared)}", flush=True)
    for rep in range(args.reps):
        for t in threads:
            got = run_worker(sys.executable, ["ours", str(t), str(ids), args.kernel, args.head], env)
            if got:
                runs["gptq-bridge"][t].append(got)
                print(f"rep {rep} threads {t} gptq-bridge {json.dumps(got)}", flush=True)
            if peer:
                got = run_worker(args.peer_python, ["peer", str(t), str(ids), gguf], env)
                if got:
                    runs["llama.cpp"][t].append(got)
                    print(f"rep {rep} threads {t} llama.cpp {json.dumps(got)}", flush=True)
    table = {}
    for engine, by_threads in runs.items():
        for t, rows in by_threads.items():
            if rows:
                table[f"{engine} {t}t"] = {
                    k: round(statistics.median(r[k] for r in rows), 2)
                    for k in ("load_s", "prefill_tok_s", "decode_tok_s")
                }
    for t in threads:
        a, b = table.get(f"gptq-bridge {t}t"), table.get(f"llama.cpp {t}t")
        if a and b:
            table[f"gptq-bridge {t}t"]["decode_vs_llama_cpp"] = round(a["decode_tok_s"] / b["decode_tok_s"], 2)
    result = dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        cpu=cpu_model(),
        cores=os.cpu_count(),
        load_average_at_start=os.getloadavg(),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        method=(
            "each run in a fresh process; runs interleaved (per repetition: each thread count, gptq-bridge then "
            "llama.cpp) because the machine's cores are shared with other work; medians over the repetitions"
        ),
        model=dict(gguf=Path(gguf).name, gptq=model_dir),
        prepared=prepared,
        prefill_tokens=PREFILL,
        new_tokens=NEW,
        medians=table,
        runs=runs,
    )
    print(json.dumps(table, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
