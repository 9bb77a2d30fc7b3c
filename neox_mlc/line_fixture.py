"""A stand-in for LINE's published checkpoint: its exact config keys, token ids and file layout, random weights.

Why: everything else in the project is verified on checkpoints this project writes in its own layout;
the real model differs in ways that broke the workflow (bool causal-mask buffers in the safetensors,
a tied head, a SentencePiece-only tokenizer with a T5Tokenizer config). This writes the same layout
at any size, in seconds when tiny and ~7.2 GB at the real 3.6B shape (the full-size benchmark):

* ``config.json``: LINE's keys and values (GPTNeoXForCausalLM, rotary_pct 1.0, sequential residual,
  ``tie_word_embeddings`` true, bos/eos/pad/end_token_id 2), sizes as asked;
* ``model.safetensors`` (or ``pytorch_model.bin``, a plain ``torch.save`` of the state dict) in float16
  with the buffers GPT-NeoX checkpoints of that era store: per layer ``attention.bias`` (bool
  ``[1, 1, P, P]`` causal mask), ``attention.masked_bias`` (float32 scalar) and
  ``attention.rotary_emb.inv_freq`` (float32); with or without ``embed_out.weight``;
* ``spiece.model``: a SentencePiece unigram model trained on ``data/`` (NFKC, optional byte
  fallback), ids 0 ``<unk>``, 1 ``<s>``, 2 ``</s>``, 3 ``<pad>``; LINE's ``tokenizer_config.json``
  (T5Tokenizer, extra_ids 0, keep_accents) and ``special_tokens_map.json`` (pad ``</s>``).

``--eos-chain`` (tiny sizes) shapes three embedding rows so that greedy decoding after a prompt
ending in ``システム:`` emits one token and then ``</s>`` (id 2): the end-to-end test of stop ids.
Seeded and single-threaded: the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neox_mlc.common import REPO_ROOT, WorkflowError, atomic_path, run_cli

LINE_SHAPE = {"hidden_size": 3072, "num_hidden_layers": 30, "num_attention_heads": 32, "intermediate_size": 12288,
              "vocab_size": 51200, "max_position_embeddings": 2048}
CHAIN_PROMPT = "ユーザー: こんにちは<NL>システム:"  # the prompt format of the line_llm template
_CHAIN_SCALE = 40.0


def line_config(hidden: int, layers: int, heads: int, inter: int, vocab: int, max_pos: int) -> dict[str, Any]:
    """LINE's config.json (japanese-large-lm-3.6b-instruction-sft) with the sizes replaced."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "bos_token_id": 2,
        "classifier_dropout": 0.1,
        "end_token_id": 2,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": max_pos,
        "model_type": "gpt_neox",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 2,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
        "transformers_version": "4.29.2",
        "use_cache": True,
        "use_parallel_residual": False,
        "vocab_size": vocab,
    }


def train_spiece(out_dir: Path, corpus: Sequence[Path], vocab_size: int, byte_fallback: bool) -> int:
    """Train ``spiece.model`` (unigram, nmt_nfkc) on the corpus lines; returns the piece count."""
    import sentencepiece as spm

    text = "\n".join(Path(p).read_text(encoding="utf-8") for p in corpus)
    if not text.strip():
        raise WorkflowError("SentencePiece corpus is empty")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text.splitlines()), model_prefix=str(out_dir / "spiece"), vocab_size=vocab_size,
            model_type="unigram", normalization_rule_name="nmt_nfkc", character_coverage=0.995 if byte_fallback else 1.0,
            byte_fallback=byte_fallback, unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False,
            num_threads=1, minloglevel=2,
        )
    except RuntimeError as err:
        raise WorkflowError(f"SentencePiece training failed: {str(err).splitlines()[0][-160:]}") from None
    (out_dir / "spiece.vocab").unlink()
    return spm.SentencePieceProcessor(model_file=str(out_dir / "spiece.model")).vocab_size()


def write_tokenizer_configs(out_dir: Path) -> None:
    """LINE's T5Tokenizer config files (the model card loads them with use_fast=False)."""
    tok_cfg = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "keep_accents": True, "additional_special_tokens": [],
               "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>", "sp_model_kwargs": {}}
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


_ST_DTYPE = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(bool): "BOOL"}


def tensor_specs(cfg: dict[str, Any], embed_out: bool) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """Every tensor of the checkpoint, in file order: (name, shape, dtype), parameters and buffers."""
    h, f, v, pos = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["max_position_embeddings"]
    rot = int(h // cfg["num_attention_heads"] * cfg["rotary_pct"])
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    specs = [("gpt_neox.embed_in.weight", (v, h), f16)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,), f16), (p + "input_layernorm.bias", (h,), f16),
            (p + "post_attention_layernorm.weight", (h,), f16), (p + "post_attention_layernorm.bias", (h,), f16),
            (p + "attention.query_key_value.weight", (3 * h, h), f16), (p + "attention.query_key_value.bias", (3 * h,), f16),
            (p + "attention.dense.weight", (h, h), f16), (p + "attention.dense.bias", (h,), f16),
            (p + "mlp.dense_h_to_4h.weight", (f, h), f16), (p + "mlp.dense_h_to_4h.bias", (f,), f16),
            (p + "mlp.dense_4h_to_h.weight", (h, f), f16), (p + "mlp.dense_4h_to_h.bias", (h,), f16),
            # the non-parameter buffers GPT-NeoX checkpoints of that era store, in their real dtypes
            (p + "attention.bias", (1, 1, pos, pos), np.dtype(bool)),
            (p + "attention.masked_bias", (), f32),
            (p + "attention.rotary_emb.inv_freq", (rot // 2,), f32),
        ]
    specs += [("gpt_neox.final_layer_norm.weight", (h,), f16), ("gpt_neox.final_layer_norm.bias", (h,), f16)]
    if embed_out:
        specs.append(("embed_out.weight", (v, h), f16))
    return specs


def make_tensor(name: str, shape: tuple[int, ...], dtype: np.dtype, seed: int, index: int) -> np.ndarray:
    """One tensor's values: seeded by (seed, position), so each can be made on its own."""
    if name.endswith("attention.bias"):
        pos = shape[-1]
        return np.tril(np.ones((pos, pos), dtype=bool)).reshape(shape)
    if name.endswith("masked_bias"):
        return np.array(-1e9, dtype=np.float32)
    if name.endswith("inv_freq"):
        rot = 2 * shape[0]
        return (1.0 / 10000 ** (np.arange(0, rot, 2, dtype=np.float32) / rot)).astype(np.float32)
    rng = np.random.default_rng([seed, index])
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= 0.02
    if "layernorm.weight" in name or "layer_norm.weight" in name:
        values += 1.0
    return values.astype(dtype)


def _chain_rows(cfg: dict[str, Any], prompt_last: int, reply: int, seed: int) -> dict[int, np.ndarray]:
    """Embedding rows that make greedy decoding go prompt_last -> reply -> 2 (``</s>``).

    With large, zero-mean, orthogonal rows the residual stream is dominated by the current token's
    embedding, and the tied head scores row j by its dot product with it: ``reply`` (1.5 u_P + u_A)
    beats ``prompt_last`` itself (u_P), and ``</s>`` (4 u_A) beats ``reply`` from there.
    """
    h = cfg["hidden_size"]
    rng = np.random.default_rng([seed, 99])
    basis = rng.standard_normal((h, 2))
    basis -= basis.mean(axis=0)
    q, _ = np.linalg.qr(basis)
    q -= q.mean(axis=0)
    u_p, u_a = q[:, 0] * np.sqrt(h), q[:, 1] * np.sqrt(h)
    s = _CHAIN_SCALE / np.sqrt(h)
    return {prompt_last: s * u_p, reply: s * (1.5 * u_p + u_a), 2: s * 4 * u_a}


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...], np.dtype]], produce: Any) -> int:
    """Stream tensors into a safetensors file one at a time (the full-size stand-in is 7.2 GB)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for i, (name, shape, dtype) in enumerate(specs):
            value = produce(i, name, shape, dtype)
            if value.shape != shape or value.dtype != dtype:
                raise WorkflowError(f"{name}: made {value.shape} {value.dtype}, planned {shape} {dtype}")
            out.write(np.ascontiguousarray(value).tobytes())
    return 8 + len(raw) + offset


def write_torch_bin(path: Path, specs: list[tuple[str, tuple[int, ...], np.dtype]], produce: Any) -> None:
    """``pytorch_model.bin`` as ``torch.save`` writes it (bool tensors pickle as ``torch.BoolStorage``)."""
    import torch

    state = {name: torch.from_numpy(np.ascontiguousarray(produce(i, name, shape, dtype))) for i, (name, shape, dtype) in enumerate(specs)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def make_line_checkpoint(
    out: Path, *, hidden: int, layers: int, heads: int, inter: int, max_pos: int, vocab: int | None = None,
    spm_vocab: int | None = None, byte_fallback: bool = False, embed_out: bool = False, weights: str = "safetensors",
    eos_chain: bool = False, seed: int = 0, corpus: Sequence[Path] = (),
) -> dict[str, Any]:
    """Write the stand-in into ``out`` atomically; returns its config. ``vocab`` defaults to the spiece size."""
    if weights not in ("safetensors", "bin"):
        raise WorkflowError(f"weights format {weights!r}; allowed: safetensors, bin")
    if hidden % heads:
        raise WorkflowError(f"hidden size {hidden} is not divisible by {heads} heads")
    corpus = list(corpus) or sorted((REPO_ROOT / "data").glob("*.txt"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        pieces = train_spiece(tmp, corpus, spm_vocab or (700 if byte_fallback else 400), byte_fallback)
        write_tokenizer_configs(tmp)
        cfg = line_config(hidden, layers, heads, inter, vocab or pieces, max_pos)
        if cfg["vocab_size"] < pieces:
            raise WorkflowError(f"vocab_size {cfg['vocab_size']} is smaller than the tokenizer's {pieces} pieces")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        chain: dict[int, np.ndarray] = {}
        if eos_chain:
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(tmp / "spiece.model"))
            last, reply = sp.encode(CHAIN_PROMPT)[-1], sp.piece_to_id("。")
            if len({last, reply, 0, 2}) < 4:
                raise WorkflowError(f"--eos-chain needs distinct prompt-end, reply and eos tokens; got {last}, {reply}, 2")
            chain = _chain_rows(cfg, last, reply, seed)
        specs = tensor_specs(cfg, embed_out)

        def produce(i: int, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            value = make_tensor(name, shape, dtype, seed, i if name != "embed_out.weight" else 0)
            if chain and name in ("gpt_neox.embed_in.weight", "embed_out.weight"):
                for row, vec in chain.items():
                    value[row] = vec.astype(dtype)
            return value

        if weights == "safetensors":
            write_safetensors(tmp / "model.safetensors", specs, produce)
        else:
            write_torch_bin(tmp / "pytorch_model.bin", specs, produce)
    return cfg


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    ap.add_argument("--full-size", action="store_true", help="LINE's real 3.6B shape (~7.2 GB of float16)")
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--intermediate-size", type=int, default=256)
    ap.add_argument("--max-position-embeddings", type=int, default=512)
    ap.add_argument("--vocab-size", type=int, help="config vocab_size (default: the tokenizer's piece count)")
    ap.add_argument("--spm-vocab", type=int, help="SentencePiece pieces to train (default 400; 700 with byte fallback)")
    ap.add_argument("--byte-fallback", action="store_true")
    ap.add_argument("--embed-out", action="store_true", help="also store embed_out.weight (a copy of the tied head)")
    ap.add_argument("--weights", choices=["safetensors", "bin"], default="safetensors")
    ap.add_argument("--eos-chain", action="store_true", help="greedy reply to the line_llm prompt is one token, then </s>")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    sizes = {"hidden": a.hidden_size, "layers": a.num_layers, "heads": a.num_heads, "inter": a.intermediate_size,
             "max_pos": a.max_position_embeddings, "vocab": a.vocab_size}
    if a.full_size:
        s = LINE_SHAPE
        sizes = {"hidden": s["hidden_size"], "layers": s["num_hidden_layers"], "heads": s["num_attention_heads"],
                 "inter": s["intermediate_size"], "max_pos": s["max_position_embeddings"], "vocab": s["vocab_size"]}
    cfg = make_line_checkpoint(
        Path(a.output), **sizes, spm_vocab=a.spm_vocab, byte_fallback=a.byte_fallback, embed_out=a.embed_out,
        weights=a.weights, eos_chain=a.eos_chain, seed=a.seed,
    )
    print(f"wrote LINE-layout checkpoint to {a.output}: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
