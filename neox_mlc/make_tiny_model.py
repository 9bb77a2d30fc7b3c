"""Generate the offline default model: a tiny GPT-NeoX checkpoint and a Japanese BPE tokenizer.

Why: Hugging Face downloads are impossible offline, yet every later step must run for real. This
writes what a snapshot of a real repo holds (``config.json`` written by transformers'
``GPTNeoXConfig``, ``model.safetensors`` in float16, ``tokenizer.json``, ``tokenizer_config.json``),
so the rest of the workflow cannot tell it from a download. The tokenizer is a byte-level BPE trained
on the Japanese text shipped in ``data/``, so Japanese round-trips exactly. Everything is seeded and
single-threaded: the same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from neox_mlc.common import WorkflowError, atomic_path, check_output, run_cli, usable_cpus

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<NL>"]  # ids 0..4; LINE's stop ids [3, 0] = pad, unk


def train_tokenizer(corpus: Path, vocab_size: int, out_dir: Path) -> int:
    """Train and save a byte-level BPE; returns the vocabulary size actually reached."""
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = [ln for ln in corpus.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise WorkflowError(f"tokenizer corpus {corpus} is empty")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines * 4, trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": 2048,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    return tok.get_vocab_size(with_added_tokens=True)


def make_model(
    out: Path,
    corpus: Path,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    vocab_size: int,
    max_position_embeddings: int,
    rotary_pct: float,
    seed: int,
    train_steps: int = 0,
    threads: int | None = None,
) -> None:
    """Write the whole checkpoint directory atomically (``threads``: torch's, default up to 2)."""
    check_output(out, "make_tiny_model", [corpus])
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    torch.set_num_threads(threads or min(2, usable_cpus()))
    with atomic_path(out, "make_tiny_model", [corpus]) as tmp:
        tmp.mkdir(parents=True)
        reached = train_tokenizer(corpus, vocab_size, tmp)
        padded_vocab = -(-max(reached, vocab_size) // 64) * 64
        cfg = GPTNeoXConfig(
            vocab_size=padded_vocab,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            rotary_pct=rotary_pct,
            rotary_emb_base=10000,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
        model = GPTNeoXForCausalLM(cfg)
        if train_steps:
            from neox_mlc.train_tiny import train

            losses = train(model, tmp, corpus, train_steps, seed)
            print(f"trained {train_steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        model = model.to(torch.float16)
        model.save_pretrained(tmp, safe_serialization=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--corpus", default="data/corpus_ja.txt")
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--intermediate-size", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--max-position-embeddings", type=int, default=1024)
    ap.add_argument("--rotary-pct", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch threads (default: up to 2, within the usable CPUs)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads is not None and a.threads < 1:
        raise WorkflowError(f"--threads {a.threads} is out of range; allowed: 1 or more")
    corpus = Path(a.corpus)
    if not corpus.is_file():
        raise WorkflowError(f"tokenizer corpus not found: {corpus}")
    make_model(
        Path(a.output), corpus, a.hidden_size, a.num_layers, a.num_heads, a.intermediate_size,
        a.vocab_size, a.max_position_embeddings, a.rotary_pct, a.seed, a.train_steps, a.threads,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
