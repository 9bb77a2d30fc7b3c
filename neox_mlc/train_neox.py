"""Train the evaluation model: a small GPT-NeoX with LINE's architecture on a packaged Japanese corpus.

Why: quantization quality means little on a model that has learned nothing (the tiny default
memorised 3.7 KB and is worse than a unigram model on unseen text). This trains, on CPU in minutes
and reproducibly (fixed seeds, fixed batch order, deterministic kernels, a fixed thread count):

* a SentencePiece tokenizer like LINE's ``spiece.model`` — unigram, NFKC, byte fallback, ids
  0 ``<unk>``, 1 ``<s>``, 2 ``</s>``, 3 ``<pad>``, plus ``<NL>`` (4), the template's newline —
  on the training split only, shipped as LINE ships it (``spiece.model`` + ``T5Tokenizer`` config),
  so the workflow's tokenizer step converts it exactly as it converts LINE's;
* a GPT-NeoX with LINE's choices (sequential residual, rotary on every head dimension, tied input
  and output embeddings, bos/eos 2... as LINE's config) on the training split's pages, each page
  followed by ``</s>``.

The held-out split is never read here. ``training.json`` records the loss curve, tokens seen, wall
and CPU time, so the report can say what the model cost.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neox_mlc.common import WorkflowError, atomic_path, write_json

PARAGRAPH_SEP = "<NL>"
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}  # LINE's spiece.model layout
TOKENIZER_CONFIG = {
    "tokenizer_class": "T5Tokenizer",  # what LINE's tokenizer_config.json names
    "extra_ids": 0,
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "additional_special_tokens": [],
    "model_max_length": 2048,
}


@dataclass(frozen=True)
class TrainSpec:
    """Everything that decides the model's bytes (a change retrains)."""

    vocab_size: int = 8000
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 3
    intermediate_size: int = 768
    max_position_embeddings: int = 2048
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 400
    lr: float = 2e-3
    seed: int = 0
    threads: int = 2

    def check(self) -> None:
        if self.hidden_size % self.num_heads:
            raise WorkflowError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.seq_len > self.max_position_embeddings:
            raise WorkflowError(f"seq_len {self.seq_len} exceeds max_position_embeddings {self.max_position_embeddings}")


# ---------------------------------------------------------------- tokenizer


def train_sentencepiece(train_txt: Path, vocab_size: int, out_dir: Path) -> Path:
    """``out_dir/spiece.model`` trained on the paragraphs of ``train_txt`` (one thread: reproducible)."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        paragraphs = Path(tmp) / "paragraphs.txt"
        with open(train_txt, encoding="utf-8") as src, open(paragraphs, "w", encoding="utf-8") as dst:
            for line in src:
                for para in line.rstrip("\n").split(PARAGRAPH_SEP):
                    if para.strip():
                        dst.write(para + "\n")
        try:
            spm.SentencePieceTrainer.train(
                input=str(paragraphs), model_prefix=str(Path(tmp) / "spiece"), model_type="unigram", vocab_size=vocab_size,
                normalization_rule_name="nfkc", byte_fallback=True, character_coverage=1.0, user_defined_symbols=[PARAGRAPH_SEP],
                input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 16, num_threads=1, minloglevel=2,
                **SPECIAL_IDS,
            )  # fmt: skip
        except RuntimeError as err:  # e.g. a vocabulary smaller than the characters it must cover
            raise WorkflowError(f"sentencepiece cannot train vocab_size {vocab_size} on {train_txt}: {str(err).splitlines()[0]}") from None
        _drop_paths(Path(tmp) / "spiece.model", out_dir / "spiece.model")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    special = {k: TOKENIZER_CONFIG[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return out_dir / "spiece.model"


def _drop_paths(src: Path, dst: Path) -> None:
    """Copy ``spiece.model`` without the temporary paths sentencepiece records in its trainer spec.

    Why: the trainer stores ``input`` and ``model_prefix`` verbatim; they name a random temporary
    directory, so two identical trainings would otherwise differ in bytes.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(src.read_bytes())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.input.append("train.txt")
    proto.trainer_spec.model_prefix = "spiece"
    dst.write_bytes(proto.SerializeToString())


def page_ids(spiece: Path, text_file: Path) -> np.ndarray:
    """Every page of ``text_file`` tokenized, each followed by ``</s>``: the training stream."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spiece))
    pages = [line for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids: list[int] = []
    for row in sp.encode(pages):
        ids += row + [SPECIAL_IDS["eos_id"]]
    return np.asarray(ids, dtype=np.int64)


# ---------------------------------------------------------------- model


def neox_config(spec: TrainSpec, vocab_size: int) -> Any:
    """LINE's architecture choices at a small size (see ANCHORS.md: LINE's config.json)."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings, rotary_pct=1.0, rotary_emb_base=10000,
        use_parallel_residual=False, tie_word_embeddings=True, layer_norm_eps=1e-5,
        bos_token_id=SPECIAL_IDS["eos_id"], eos_token_id=SPECIAL_IDS["eos_id"], pad_token_id=SPECIAL_IDS["pad_id"],
    )  # fmt: skip


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 % of the peak."""
    warm = max(1, steps // 20)
    return min(1.0, (step + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def train_model(spec: TrainSpec, ids: np.ndarray, log_every: int = 25) -> tuple[Any, dict[str, Any]]:
    """A GPT-NeoX trained on ``ids``; returns the model (eval mode, float32) and the training record."""
    import torch
    from transformers import GPTNeoXForCausalLM

    spec.check()
    if len(ids) <= spec.seq_len + 1:
        raise WorkflowError(f"training text gives {len(ids)} tokens; at least seq_len + 2 = {spec.seq_len + 2} are needed")
    torch.manual_seed(spec.seed)
    torch.set_num_threads(spec.threads)
    torch.use_deterministic_algorithms(True)
    model = GPTNeoXForCausalLM(neox_config(spec, spec.vocab_size))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec.steps))
    stream = torch.from_numpy(ids)
    rng = np.random.default_rng(spec.seed)
    losses: list[float] = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    model.train()
    try:
        for step in range(spec.steps):
            starts = rng.integers(0, len(ids) - spec.seq_len - 1, size=spec.batch_size)
            x = torch.stack([stream[s : s + spec.seq_len] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if log_every and (step % log_every == 0 or step == spec.steps - 1):
                print(f"step {step}: loss {losses[-1]:.3f}, {time.perf_counter() - wall0:.0f} s", flush=True)
    finally:
        torch.use_deterministic_algorithms(False)
    model.eval()
    record = {
        "spec": asdict(spec),
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_tokens": len(ids),
        "tokens_seen": spec.steps * spec.batch_size * spec.seq_len,
        "epochs": spec.steps * spec.batch_size * spec.seq_len / len(ids),
        "loss_curve": [round(v, 4) for v in losses],
        "wall_s": round(time.perf_counter() - wall0, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
        "torch_threads": spec.threads,
    }
    return model, record


def build(train_txt: Path, spec: TrainSpec, out: Path) -> dict[str, Any]:
    """The whole checkpoint directory, as a Hugging Face snapshot of LINE's shape, written atomically."""
    import torch

    spec.check()
    with atomic_path(out, "train_neox", [train_txt]) as tmp:
        tmp.mkdir(parents=True)
        spiece = train_sentencepiece(train_txt, spec.vocab_size, tmp)
        model, record = train_model(spec, page_ids(spiece, train_txt))
        model.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "training.json", record)
    return record


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train_text", help="training split: one page per line, <NL> between paragraphs")
    ap.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    for field, default in asdict(TrainSpec()).items():
        ap.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    train_txt = Path(a.train_text)
    if not train_txt.is_file():
        raise WorkflowError(f"training text not found: {train_txt}")
    spec = TrainSpec(**{k: getattr(a, k) for k in asdict(TrainSpec())})
    record = build(train_txt, spec, Path(a.output))
    print(f"trained {record['parameters']} parameters on {record['tokens_seen']} tokens in {record['wall_s']} s (cpu {record['cpu_s']} s)")
    return 0
