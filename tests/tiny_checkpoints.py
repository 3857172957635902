"""Tiny real Llama checkpoints in GPTQ format, built in tests (random weights, real file layout)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gptq_bridge.config import QuantizeConfig
from gptq_bridge.quantize.gptq_layer import pack_layer, rtn_quantize
from gptq_bridge.writer import write_checkpoint

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARED_INPUT = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input"}
SHARED_INPUT |= {"gate_proj": "mlp input", "up_proj": "mlp input"}
WORDS = "the a of to and in is it you that he was for on are with as I his they be at one have this from".split()


def llama_config(hidden: int = 160, intermediate: int = 224, layers: int = 2, vocab: int = 96, **kw) -> LlamaConfig:
    """Widths 160 and 224 are multiples of 32 that group size 128 (and 64) does not divide: partial groups."""
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **kw,
    )


def tiny_tokenizer(vocab: int = 96) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + WORDS
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@dataclass
class TinyCheckpoint:
    path: Path
    reference: LlamaForCausalLM  # float32 model holding exactly the weights the checkpoint stands for
    config: QuantizeConfig


def build(
    out: Path,
    *,
    bits: int = 4,
    group_size: int = 32,
    desc_act: bool = False,
    sym: bool = True,
    checkpoint_format: str = "gptq",
    config_location: str = "quantize_config",
    hf_config: LlamaConfig | None = None,
    seed: int = 0,
    tokenizer: bool = False,
    max_shard_bytes: int | None = None,
    static_groups: bool = False,
    shared_order: bool = False,
    **config_extra,
) -> TinyCheckpoint:
    """shared_order: with desc_act, q/k/v share one act-order and gate/up another, as GPTQ gives layers that read
    the same input (one Hessian); else every layer draws its own."""
    torch.manual_seed(seed)
    hf_config = hf_config or llama_config()
    reference = LlamaForCausalLM(hf_config).float().eval()
    config = QuantizeConfig(
        bits=bits,
        group_size=group_size,
        desc_act=desc_act,
        sym=sym,
        checkpoint_format=checkpoint_format,
        static_groups=static_groups,
        **config_extra,
    )
    tensors: dict[str, torch.Tensor] = {}
    orders: dict[str, torch.Tensor] = {}  # shared act-orders by decoder layer and input
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name.rsplit(".", 1)[-1] in LINEARS:
                in_features = module.in_features
                block, _, short = name.rpartition(".")
                if not desc_act:
                    order = None
                elif shared_order and short in SHARED_INPUT:
                    key = block.rpartition(".")[0] + SHARED_INPUT[short]  # the decoder layer and its input
                    if key not in orders:
                        orders[key] = torch.randperm(in_features)
                    order = orders[key]
                else:
                    order = torch.randperm(in_features)
                layer = rtn_quantize(
                    module.weight,
                    bits,
                    group_size,
                    sym=sym,
                    order=order,
                    min_zero=1 if checkpoint_format == "gptq" else 0,
                )
                for key, t in pack_layer(layer, bits, checkpoint_format).items():
                    tensors[f"{name}.{key}"] = t
                module.weight.copy_(layer.dequantize().t())
        for name, param in reference.named_parameters():
            if name.split(".")[-2] not in LINEARS:
                half = param.detach().to(torch.float16)
                param.copy_(half.float())
                tensors[name] = half
    tok = tiny_tokenizer(hf_config.vocab_size) if tokenizer else None
    path = write_checkpoint(
        out, hf_config, tensors, config, tokenizer=tok, config_location=config_location, max_shard_bytes=max_shard_bytes
    )
    return TinyCheckpoint(path=path, reference=reference, config=config)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def hub_cache(cache_root: Path, repo_id: str, branches: dict[str, Path]) -> dict[str, str]:
    """Lay checkpoints out as huggingface_hub's cache does: blobs, snapshots/<commit> of links, refs/<branch>.

    Returns the commit hash of each branch.
    """
    import hashlib
    import os
    import shutil

    repo = cache_root / ("models--" + repo_id.replace("/", "--"))
    commits = {}
    for branch, src in branches.items():
        commit = hashlib.sha1(f"{repo_id}@{branch}".encode()).hexdigest()
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (repo / "blobs").mkdir(exist_ok=True)
        for f in sorted(src.iterdir()):
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            if not blob.exists():
                shutil.copyfile(f, blob)
            os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
        commits[branch] = commit
    return commits
