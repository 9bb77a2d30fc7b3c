"""The transformers reference: the Hugging Face model in float32, on its own or on replaced weights.

Why: a compiled bundle is judged against transformers on the original checkpoint (what quantization
costs); the tests also load it with the very weights a bundle stores, dequantized
(tests/bundle_reference.py), to check compile + runtime independently of quantization error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def load_hf_model(model_dir: str | Path, state: dict[str, np.ndarray] | None = None) -> Any:
    """transformers' GPTNeoXForCausalLM in float32, optionally with replaced weights."""
    import torch
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    if state is not None:
        keys = set(model.state_dict())
        # transformers 5 names the output head ``lm_head`` (checkpoints keep ``embed_out``).
        rename = {"embed_out.weight": "lm_head.weight"} if "embed_out.weight" not in keys else {}
        tensors = {rename.get(k, k): torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        # a tied head (LINE's checkpoints) is the embedding itself: replacing one replaces both
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        real_missing = [m for m in missing if m not in tied and not m.endswith(("masked_bias", "attention.bias", "inv_freq"))]
        if real_missing or unexpected:
            raise ValueError(f"state does not fit the model: missing {real_missing[:3]}, unexpected {unexpected[:3]}")
    return model


def hf_logits(model: Any, ids: list[int]) -> np.ndarray:
    """float32 logits ``[len(ids), vocab]`` for one sequence."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long))
    return out.logits[0].float().numpy()
