"""Test helper: the HF-named float32 weights a bundle computes with (its tensor cache, dequantized).

Why in tests: only the tests load transformers with a bundle's own weights, to tell compile/runtime
errors apart from quantization error; the workflow itself never needs the inverse layout.
"""

from __future__ import annotations

from pathlib import Path

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


def in_features_of(model_dir: str | Path) -> dict[str, int]:
    """K of every 2-D weight in a checkpoint, from its headers."""
    from neox_mlc.hf_checkpoint import TensorIndex

    index = TensorIndex(model_dir)
    k = {n: info.shape[1] for n, info in index.tensors.items() if len(info.shape) == 2}
    k.setdefault("embed_out.weight", k["gpt_neox.embed_in.weight"])  # a tied head is the embedding
    return k
