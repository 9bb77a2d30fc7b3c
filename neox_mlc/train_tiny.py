"""Train the tiny generated GPT-NeoX briefly on the shipped Japanese text, deterministically.

Why: random weights make every quantization look alike (the logits barely depend on the input), so
perplexity and KL differences between modes would mean nothing. A few hundred AdamW steps on
``data/corpus_ja.txt`` give the weights real structure in seconds on 2 CPU cores. One thread,
fixed seeds and a fixed batch order keep the result byte-for-byte reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def corpus_ids(tok_dir: Path, corpus: Path) -> np.ndarray:
    """All corpus lines tokenized (with the template's <NL> kept as one token), joined by </s>."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos = tok.token_to_id("</s>")
    ids: list[int] = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids += tok.encode(line).ids + [eos]
    return np.asarray(ids, dtype=np.int64)


def train(model: Any, tok_dir: Path, corpus: Path, steps: int, seed: int, seq_len: int = 64, batch: int = 16, lr: float = 3e-3) -> list[float]:
    """Train ``model`` in place; returns the loss curve."""
    import torch

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    ids = torch.from_numpy(corpus_ids(tok_dir, corpus))
    if len(ids) <= seq_len + 1:
        raise ValueError(f"corpus {corpus} is too short to train on ({len(ids)} tokens)")
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    model.train()
    losses = []
    try:
        for _ in range(steps):
            starts = rng.integers(0, len(ids) - seq_len - 1, size=batch)
            x = torch.stack([ids[s : s + seq_len] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    model.eval()
    return losses
