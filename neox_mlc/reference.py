"""The transformers reference: the Hugging Face model on original or on dequantized bundle weights.

Why: a compiled bundle is judged against transformers twice — against the original checkpoint
(what quantization costs) and against transformers running the very weights the bundle stores,
dequantized (whether compile + runtime compute the model correctly, independent of quantization
error). Both need the inverse of the converter's layout changes, kept here next to each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from neox_mlc.quantization import Quantization, dequantize, get_quantization
from neox_mlc.tensor_cache import load_numpy


def _undo_qkv(value: np.ndarray, heads: int) -> np.ndarray:
    """MLC's ``[3, heads, head_dim]`` rows back to HF's per-head ``[heads, 3, head_dim]``."""
    rows = value.shape[0]
    rest = value.shape[1:]
    return value.reshape(3, heads, rows // (3 * heads), *rest).swapaxes(0, 1).reshape(value.shape)


def hf_state_from_cache(cache_dir: str | Path, quant: Quantization | str, heads: int, in_features: dict[str, int]) -> dict[str, np.ndarray]:
    """HF-named float32 weights equal to what the bundle computes with.

    ``in_features`` maps each quantized weight's HF name to its K (the padded tail is dropped).
    """
    quant = get_quantization(quant) if isinstance(quant, str) else quant
    cache = load_numpy(cache_dir)
    out: dict[str, np.ndarray] = {}
    for name, value in cache.items():
        if name.endswith(".q_scale"):
            continue
        if name.endswith(".q_weight"):
            base = name.removesuffix(".q_weight")
            hf = base + ".weight"
            q_weight, q_scale = value, cache[base + ".q_scale"]
            if quant.stores_transposed(name):
                q_weight, q_scale = q_weight.T, q_scale.T
            value = dequantize(np.ascontiguousarray(q_weight), np.ascontiguousarray(q_scale), quant, in_features[hf])
            name = hf
        value = value.astype(np.float32)
        if ".attention.query_key_value." in name:
            value = _undo_qkv(value, heads)
        out[name] = value
    return out


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
        real_missing = [m for m in missing if not m.endswith(("masked_bias", "attention.bias", "inv_freq"))]
        if real_missing or unexpected:
            raise ValueError(f"state does not fit the model: missing {real_missing[:3]}, unexpected {unexpected[:3]}")
    return model


def hf_logits(model: Any, ids: list[int]) -> np.ndarray:
    """float32 logits ``[len(ids), vocab]`` for one sequence."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long))
    return out.logits[0].float().numpy()


def in_features_of(model_dir: str | Path) -> dict[str, int]:
    """K of every 2-D weight in a checkpoint, from its headers."""
    from neox_mlc.hf_checkpoint import TensorIndex

    index = TensorIndex(model_dir)
    k = {n: info.shape[1] for n, info in index.tensors.items() if len(info.shape) == 2}
    k.setdefault("embed_out.weight", k["gpt_neox.embed_in.weight"])  # a tied head is the embedding
    return k
