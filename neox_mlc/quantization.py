"""The quantization registry: the one place that knows each mode's storage layout.

Layout implemented (MLC-LLM's "group quantization", checked byte-for-byte against the shards that
MLC-LLM commit 79d603f wrote for the tiny reference model in ../shared/fixtures/mlc-reference/, see
tests/test_conformance.py):

* ``q0f32`` / ``q0f16``: no quantization; every tensor is cast to the model dtype, except the MLP
  biases, which stay in ``ffn_out_dtype`` (float32) as MLC's GPT-NeoX keeps them.
* ``q4f16_1``, ``q4f32_1``, ``q3f16_1`` and ``q4f16_0``: every 2-D weight (the four linear layers of
  each block, ``embed_out`` and the ``embed_in`` embedding) becomes ``<name>.q_weight`` (uint32) and
  ``<name>.q_scale`` (model dtype). Layer norms and all biases are not quantized.
  For a weight ``[N, K]`` the reduction axis is K (the last one). K is zero-padded up to a multiple of
  the group size (MLC's rule for a tensor whose size is not divisible by the group size: pad the last
  group, never reject). Per group: ``scale = max|w| / max_int`` with ``max_int = 2**(bits-1) - 1``
  (7 for 4-bit, 3 for 3-bit); stored value ``clamp(round(w / scale + max_int), 0, 2 * max_int)``
  where the offset is added *before* rounding, in the model dtype (so float16 spacing near 8 turns
  e.g. 1.501 + 7 into 8.5, which rounds half-to-even to 8 — getting this order wrong changes ~0.4 %
  of the codes); ``32 // bits`` values per uint32 word, element j of a word at bit
  ``bits * j``. Scale and quotient are computed in the model dtype (float16 rounding for ``f16``).
  ``_1`` stores ``q_weight [N, K/epw]`` and ``q_scale [N, K/group]``; ``_0`` stores both transposed
  (``[K/epw, N]``, ``[K/group, N]``) for linear layers, while ``embed_in`` keeps the ``_1`` layout.
  4-bit uses groups of 32 (8 values per word), 3-bit groups of 40 (10 values per word).
  Padding positions hold code 0 (not the zero-point), and do not take part in the group maximum.

Float32 tensors are stored as bfloat16 in the shard (``format: f32-to-bf16``); that is the tensor
cache's concern (neox_mlc/tensor_cache.py), not this module's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from neox_mlc.common import WorkflowError


@dataclass(frozen=True)
class Quantization:
    """One quantization mode as MLC-LLM names and stores it."""

    name: str
    kind: Literal["no-quant", "group-quant"]
    model_dtype: Literal["float16", "float32"]
    bits: int = 0
    group_size: int = 0
    transposed: bool = False  # the ``_0`` layout: linear-layer tensors stored [K/.., N]

    @property
    def elems_per_word(self) -> int:
        return 32 // self.bits

    @property
    def max_int(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def padded_k(self, k: int) -> int:
        """K rounded up to whole groups (MLC zero-pads the trailing partial group)."""
        return -(-k // self.group_size) * self.group_size

    def stores_transposed(self, name: str) -> bool:
        """Whether MLC parameter ``name`` is stored ``[K/.., N]``: ``_0`` linear layers only.

        One rule for the planner, the converter and the reference, decided by the destination's
        name: inferring it from shapes breaks when a pair's ``q_scale`` is converted before its
        ``q_weight``, and a tied output head has ``embed_in`` as its source but is a linear layer.
        """
        return self.layout_transposed(embedding="embed_in" in name)

    def layout_transposed(self, embedding: bool) -> bool:
        """The layout rule itself, for the model that declares the parameters: ``_0`` stores linear
        layers ``[K/.., N]``; an embedding is gathered by rows, so it keeps the ``_1`` layout."""
        return self.transposed and not embedding


QUANTIZATIONS: dict[str, Quantization] = {
    q.name: q
    for q in (
        Quantization("q0f32", "no-quant", "float32"),
        Quantization("q0f16", "no-quant", "float16"),
        Quantization("q4f16_0", "group-quant", "float16", bits=4, group_size=32, transposed=True),
        Quantization("q4f16_1", "group-quant", "float16", bits=4, group_size=32),
        Quantization("q4f32_1", "group-quant", "float32", bits=4, group_size=32),
        Quantization("q3f16_1", "group-quant", "float16", bits=3, group_size=40),
    )
}

# llama.cpp's formats the quality report puts beside these modes (quantized with the gguf package).
GGUF_PEER_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def get_quantization(name: str) -> Quantization:
    """Look a mode up, failing with the allowed names."""
    try:
        return QUANTIZATIONS[name]
    except KeyError:
        raise WorkflowError(
            f"unknown quantization {name!r}; allowed: {', '.join(QUANTIZATIONS)}"
        ) from None


_MAGIC_ROUND = np.float32(1 << 23)  # adding 2**23 rounds a float32 in [0, 2**22) to an integer (half-to-even)


def _round_to_f16_grid(x: np.ndarray) -> np.ndarray:
    """Round float32 values (in place) to the nearest float16-representable value, ties to even.

    Bit arithmetic on the float32 encoding (keep 10 of 23 mantissa bits) — the same result as
    ``x.astype(float16).astype(float32)`` for float16's normal range, several times faster. Values
    in float16's subnormal range are rounded more finely than float16 would, which cannot change a
    code here: they are far below the 0.5 that decides a rounding step.
    """
    bits = x.view(np.uint32)
    bits += np.uint32(0x0FFF) + ((bits >> np.uint32(13)) & np.uint32(1))
    bits &= np.uint32(0xFFFFE000)
    return x


def quantize(weight: np.ndarray, quant: Quantization) -> tuple[np.ndarray, np.ndarray]:
    """Group-quantize a 2-D weight ``[N, K]`` (already in the model dtype) along K.

    Returns ``(q_weight, q_scale)`` in the ``_1`` layout ``[N, K_pad/epw]`` / ``[N, K_pad/group]``;
    callers transpose for the ``_0`` layout. The arithmetic reproduces the model dtype exactly —
    float16 ufuncs compute in float32 and round each result to float16, which is emulated here with
    float32 work plus :func:`_round_to_f16_grid` — and packs with integer ops only.
    """
    if quant.kind != "group-quant":
        raise ValueError(f"{quant.name} is not a group quantization")
    if weight.ndim != 2:
        raise ValueError(f"group quantization needs a 2-D weight, got shape {weight.shape}")
    dtype = np.dtype(quant.model_dtype)
    if weight.dtype != dtype:
        raise ValueError(f"weight must be {dtype}, got {weight.dtype}")
    half = dtype == np.float16
    rows, k = weight.shape
    k_pad = quant.padded_k(k)
    groups = k_pad // quant.group_size
    if k_pad == k:
        work = weight.astype(np.float32)
    else:
        work = np.zeros((rows, k_pad), dtype=np.float32)
        work[:, :k] = weight
    work = work.reshape(rows, groups, quant.group_size)
    max_abs = np.abs(work).max(axis=2)  # exact: max of model-dtype values
    scale = (max_abs / np.float32(quant.max_int)).astype(dtype)
    inv = scale.astype(np.float32)
    inv[inv == 0] = 1  # an all-zero group: every quotient is 0, code = zero point
    work /= inv[:, :, None]
    if half:
        _round_to_f16_grid(work)
    work += np.float32(quant.max_int)  # the zero point is added before rounding, in the model dtype
    if half:
        _round_to_f16_grid(work)
    np.maximum(work, 0, out=work)
    work += _MAGIC_ROUND  # round half to even; the integer now sits in the low mantissa bits
    codes = work.view(np.uint32) - np.uint32(0x4B000000)
    np.minimum(codes, np.uint32(2 * quant.max_int), out=codes)
    if k_pad != k:
        codes.reshape(rows, k_pad)[:, k:] = 0
    codes = codes.reshape(rows, k_pad // quant.elems_per_word, quant.elems_per_word)
    packed = codes[:, :, 0].copy()
    for j in range(1, quant.elems_per_word):
        packed |= codes[:, :, j] << np.uint32(quant.bits * j)
    return packed, scale


def dequantize(
    q_weight: np.ndarray, q_scale: np.ndarray, quant: Quantization, k: int
) -> np.ndarray:
    """Inverse of :func:`quantize` (``_1`` layout in, ``[N, k]`` float32 out)."""
    rows = q_weight.shape[0]
    shifts = np.arange(quant.elems_per_word, dtype=np.uint32) * np.uint32(quant.bits)
    mask = np.uint32((1 << quant.bits) - 1)
    codes = (q_weight[:, :, None] >> shifts) & mask
    codes = codes.reshape(rows, -1).astype(np.float32) - quant.max_int
    groups = codes.reshape(rows, q_scale.shape[1], quant.group_size)
    values = groups * q_scale.astype(np.float32)[:, :, None]
    return values.reshape(rows, -1)[:, :k]


def quantize_fast(weight: np.ndarray, quant: Quantization) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize` with PyTorch's vectorised CPU kernels: same bits, several times the throughput.

    Why two implementations: numpy's float16 arithmetic and small-axis reductions are scalar loops,
    and they dominate conversion time. The numpy :func:`quantize` stays the readable specification;
    tests assert both produce identical words and scales (and the converter falls back to it where
    torch is absent). Torch computes each float16 operation in float32 and rounds once, as numpy
    does, so the quotient and the zero-point addition run natively in the model dtype. The group
    maximum is taken in float32 (exact, and ~5x faster than torch's float16 reduction over 32
    elements); 4-bit codes are packed two per byte, so a word is four bytes read as one uint32.
    """
    try:
        import torch
    except ImportError:  # the pure-numpy path is always available
        return quantize(weight, quant)
    if quant.kind != "group-quant" or weight.ndim != 2 or weight.dtype != np.dtype(quant.model_dtype):
        return quantize(weight, quant)
    rows, k = weight.shape
    k_pad = quant.padded_k(k)
    groups, epw, bits, top = k_pad // quant.group_size, quant.elems_per_word, quant.bits, quant.max_int
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only source buffer: torch only reads it
        w = torch.from_numpy(np.ascontiguousarray(weight))
    if k_pad != k:  # zero padding never raises a group's maximum; its codes are zeroed below
        w = torch.nn.functional.pad(w, (0, k_pad - k))
    w = w.view(rows, groups, quant.group_size)
    # copy=True: for float32 weights .float() would alias, and abs_ would flip the input's signs
    scale = (w.to(torch.float32, copy=True).abs_().amax(dim=2) / top).to(w.dtype)  # one rounding
    divisor = torch.where(scale == 0, torch.ones((), dtype=w.dtype), scale)  # all-zero group → code = zero point
    q = torch.div(w, divisor.unsqueeze(2))
    q.add_(top).round_().clamp_(0, 2 * top)  # zero point added before rounding, half to even
    codes = q.to(torch.uint8).view(rows, k_pad)
    codes[:, k:] = 0  # padding holds code 0, not the zero point
    codes = codes.view(rows, k_pad // epw, epw)
    if bits == 4:  # element j of a word at bit 4j: bytes of (even | odd << 4), little-endian
        packed = (codes[:, :, 0::2] | (codes[:, :, 1::2] << 4)).contiguous().view(torch.int32).view(rows, k_pad // epw)
    else:  # the bit fields do not overlap, so their sum is their bitwise or
        shifts = torch.arange(epw, dtype=torch.int32) * bits
        packed = (codes.to(torch.int32) << shifts).sum(dim=2, dtype=torch.int32)
    return packed.numpy().view(np.uint32), scale.numpy()
