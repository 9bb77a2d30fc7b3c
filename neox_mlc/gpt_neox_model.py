"""GPT-NeoX written in ``tvm.relax.frontend.nn`` with MLC-LLM's model-library interface.

Why this shape: MLC's runtime (and its iOS app) drives a model library through fixed Relax
functions — ``embed``, ``prefill``, ``decode``, ``batch_prefill``, ``batch_decode``,
``batch_verify``, ``create_tir_paged_kv_cache``, ``alloc_embedding_tensor``,
``softmax_with_temperature`` and ``_metadata`` — with parameters passed as one packed tuple in the
order ``_metadata`` lists. The names and parameter names here are those MLC-LLM's own ``compile``
produced for the reference fixture (``lib-interface.json``); the code is this project's.

Architecture facts, all read from the chat config's ``model_config`` (itself from the HF config):
parallel or sequential residual, partial rotary embedding (``rotary_pct`` of each head, applied by
TVM's paged KV cache, rotate-half "NeoX" style), rotary base, LayerNorm eps, exact (erf) GELU,
an output head of its own (MLC's format has no tied variant: for a tied checkpoint the converter
writes the embedding as ``embed_out``), MLP computed in ``ffn_out_dtype`` (float32: the MLP's
float16 overflow is why the original LINE conversion had to force it).

Linear layers are MLC's ``NT_matmul``: they read each weight in its stored layout (never a per-call
transpose), unpack quantized words inside the reduction (one read of 4-bit data per token), and
accumulate in float32; ``decode`` takes ``[1, 1, hidden]`` as MLC's does, so its kernels are static
GEMVs that TVM's dlight GPU rules and neox_mlc/cpu_schedule.py recognise.
"""

from __future__ import annotations

from typing import Any

from tvm import te, tirx, topi
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from neox_mlc import cpu_gemm, cpu_gemv
from neox_mlc.neox_config import NeoXConfig
from neox_mlc.quantization import Quantization


def _weight_element(quant: Quantization, qw: te.Tensor, qs: te.Tensor, i: Any, j: Any, transposed: bool) -> tirx.PrimExpr:
    """``W[i, j] = (code - max_int) * scale`` unpacked from MLC's words, exactly, as float32.

    Why float32: a small integer times a float16 scale is exact in float32, so every target computes
    with the quantized weight's true value. (MLC rounds it to float16 first: a difference of at most
    half a float16 ulp per weight, far inside the conformance tolerance.) On CPUs without native
    float16 arithmetic it is also the fast path: no convert-compute-round per operation.
    """
    epw, bits, group = quant.elems_per_word, quant.bits, quant.group_size
    word = qw[j // epw, i] if transposed else qw[i, j // epw]
    scale = qs[j // group, i] if transposed else qs[i, j // group]
    shift = (j % epw * bits).astype("uint32")
    code = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const((1 << bits) - 1, "uint32"))
    return (code.astype("float32") - tirx.const(quant.max_int, "float32")) * scale.astype("float32")


def _dequantize(q_weight: Tensor, q_scale: Tensor, quant: Quantization, k: int, transposed: bool, dtype: str) -> Tensor:
    """Unpack uint32 words to ``[N, k]`` in ``dtype`` (embedding rows; host prefill weights)."""
    n = q_weight.shape[1] if transposed else q_weight.shape[0]

    def compute(qw: te.Tensor, qs: te.Tensor) -> te.Tensor:
        return te.compute((n, k), lambda i, j: _weight_element(quant, qw, qs, i, j, transposed).astype(dtype), name="dequantize")

    return op.tensor_expr_op(compute, "dequantize", [q_weight, q_scale])


def _nt_matmul(x: Tensor, weights: list[Tensor], element: Any, n: int, k: int, name: str) -> Tensor:
    """``y[b, s, j] = Σ_k x[b, s, k] · W[j, k]`` in float32, reading ``W`` as stored (``element``).

    Why not ``matmul(x, permute_dims(W))``: TVM lowers that to a transpose of the whole weight on
    every call, then a matmul striding across it. Reading the stored layout directly (and, for
    quantized weights, unpacking inside the reduction) is MLC's ``NT_matmul``. Accumulating in
    float32 guards against the float16 overflow the LINE model is known for, matches what
    transformers does, and is the fast path on CPUs.
    """

    def compute(xt: te.Tensor, *ws: te.Tensor) -> te.Tensor:
        r = te.reduce_axis((0, k), name="k")
        return te.compute(
            (*xt.shape[:-1], n),
            lambda b, s, j: te.sum(xt[b, s, r].astype("float32") * element(ws, j, r).astype("float32"), axis=r),
            name="NT_matmul",
        )

    return op.tensor_expr_op(compute, name, [x, *weights])


def grouped_nt_matmul_te(xt: te.Tensor, qw: te.Tensor, qs: te.Tensor, quant: Quantization, n: int, k: int, transposed: bool) -> te.Tensor:
    """``NT_matmul`` of a group-quantized weight, one token per sequence on the host CPU, regrouped.

    ``Σ_k x_k (c_k - max_int) s_g = Σ_g s_g (Σ_{k∈g} x_k c_k - max_int Σ_{k∈g} x_k)``: the integer
    codes ``c`` meet ``x`` unscaled and each group's sum is scaled once. Why: decode on a CPU is bound by
    the instructions that unpack each weight (shift, mask, convert, subtract, scale, multiply-add). Here a
    code is masked where it lies in its word and ``x`` is pre-scaled by the matching power of two
    (exact), which leaves mask, convert and one multiply-add per weight (162.5 M q4f16_0 decode, one
    thread: 15.8 → 11.5 CPU ms per step, with AVX-512). Only the order of float32 additions changes.
    """
    epw, bits, group, groups = quant.elems_per_word, quant.bits, quant.group_size, k // quant.group_size
    lead = tuple(xt.shape[:-1])
    r = te.reduce_axis((0, group), name="r")
    xsum = te.compute((*lead, groups), lambda b, s, g: te.sum(xt[b, s, g * group + r].astype("float32"), axis=r), name="x_group_sum")

    def position(kk: Any) -> tirx.PrimExpr:
        """Where element ``kk`` of its word is read: its bit offset, one lower for an element reaching bit 31."""
        e = kk % epw
        return tirx.Select((e + 1) * bits > 31, e * bits - 1, e * bits) if epw * bits > 31 else e * bits

    def code_in_place(j: Any, kk: Any) -> tirx.PrimExpr:
        """``code · 2^position``: masked where it lies in the word (no shift down; int32-positive)."""
        word = qw[kk // epw, j] if transposed else qw[j, kk // epw]
        if epw * bits > 31:  # the top element is moved down one bit, so it does not read negative
            word = tirx.Select((kk % epw + 1) * bits > 31, tirx.shift_right(word, tirx.const(1, "uint32")), word)
        mask = tirx.shift_left(tirx.const((1 << bits) - 1, "uint32"), position(kk).astype("uint32"))
        return tirx.bitwise_and(word, mask).astype("int32").astype("float32")

    def x_unshift(b: Any, s: Any, kk: Any) -> tirx.PrimExpr:
        """``x · 2^-position``: exact (a power of two), so the product is ``x · code`` as before."""
        return xt[b, s, kk].astype("float32") * tirx.exp2(-position(kk).astype("float32"))

    rc = te.reduce_axis((0, group), name="rc")
    part = te.compute(
        (*lead, groups, n),
        lambda b, s, g, j: te.sum(x_unshift(b, s, g * group + rc) * code_in_place(j, g * group + rc), axis=rc),
        name="NT_matmul_group",
    )
    rg = te.reduce_axis((0, groups), name="rg")

    def scale(g: Any, j: Any) -> tirx.PrimExpr:
        return (qs[g, j] if transposed else qs[j, g]).astype("float32")

    return te.compute(
        (*lead, n),
        lambda b, s, j: te.sum(scale(rg, j) * (part[b, s, rg, j] - tirx.const(quant.max_int, "float32") * xsum[b, s, rg]), axis=rg),
        name="NT_matmul",
    )


def word_lanes_nt_matmul_te(xt: te.Tensor, qw: te.Tensor, qs: te.Tensor, quant: Quantization, n: int, k: int) -> te.Tensor:
    """``NT_matmul`` of a group-quantized weight stored ``[N, K/epw]`` (the ``_1`` layout), one token per sequence on the host.

    The ``[N, K]`` sibling of :func:`grouped_nt_matmul_te`. A row's words are contiguous, so SIMD runs
    along K (``cpu_schedule.WordLanesGEMV``): one vector load holds consecutive words of a row, and
    for each position ``e`` in the word the code is masked where it lies (no shift) and meets ``x``
    de-interleaved and pre-scaled by ``2^-position`` (``x_deinterleave``: ``xp[e, w] = x[w·epw + e] ·
    2^-position(e)``, exact, contiguous over ``w``, once per call). Per word,
    ``Σ_e x (c - max_int) = Σ_e xp · (c · 2^position) - max_int Σ_e x`` (``x_word_offset``, the second
    term, also once per call) is then scaled by the word's group scale. A weight costs a mask, a
    convert and a multiply-add (162.5 M q4f16_1 decode, one thread: 24.4 → 12.5 CPU ms per step with
    AVX-512). Only the order of float32 additions changes.
    """
    epw, bits, words = quant.elems_per_word, quant.bits, k // quant.elems_per_word
    lead = tuple(xt.shape[:-1])

    def position(e: int) -> int:
        """Where element ``e`` of a word is read: its bit offset, one lower for an element reaching bit 31."""
        return e * bits - 1 if (e + 1) * bits > 31 else e * bits

    xp = te.compute(
        (*lead, epw, words),
        lambda b, s, e, w: xt[b, s, w * epw + e].astype("float32")
        * tirx.exp2(-tirx.Select((e + 1) * bits > 31, e * bits - 1, e * bits).astype("float32")),
        name="x_deinterleave",
    )
    re_ = te.reduce_axis((0, epw), name="re")
    xn = te.compute(
        (*lead, words),
        lambda b, s, w: te.sum(xt[b, s, w * epw + re_].astype("float32") * tirx.const(-quant.max_int, "float32"), axis=re_),
        name="x_word_offset",
    )

    def code_in_place(j: Any, w: Any, e: int) -> tirx.PrimExpr:
        """``code · 2^position``: masked where it lies in the word (int32-positive: the top element is read one bit lower)."""
        word = tirx.shift_right(qw[j, w], tirx.const(1, "uint32")) if (e + 1) * bits > 31 else qw[j, w]
        return tirx.bitwise_and(word, tirx.const(((1 << bits) - 1) << position(e), "uint32")).astype("int32").astype("float32")

    def word_sum(b: Any, s: Any, j: Any, w: Any) -> tirx.PrimExpr:
        """``offset + Σ_e xp·code`` written out (``te.create_prim_func`` drops a reduction's ``init``), as two
        chains of multiply-adds, even and odd ``e``, so each waits on half as many (output head 2.11 → 2.02 ms)."""
        even, odd = xn[b, s, w], None
        for e in range(epw):
            term = xp[b, s, e, w] * code_in_place(j, w, e)
            if e % 2 == 0:
                even = even + term
            else:
                odd = term if odd is None else odd + term
        return even if odd is None else even + odd

    part = te.compute((*lead, n, words), word_sum, name="NT_matmul_word")
    rw = te.reduce_axis((0, words), name="rw")
    return te.compute(
        (*lead, n),
        lambda b, s, j: te.sum(qs[j, rw * epw // quant.group_size].astype("float32") * part[b, s, j, rw], axis=rw),
        name="NT_matmul",
    )


def _grouped_nt_matmul(x: Tensor, q_weight: Tensor, q_scale: Tensor, quant: Quantization, n: int, k: int, transposed: bool) -> Tensor:
    """:func:`grouped_nt_matmul_te` as one Relax op (its kernel is scheduled by ``cpu_schedule.GroupedGEMV``)."""

    def compute(xt: te.Tensor, qw: te.Tensor, qs: te.Tensor) -> te.Tensor:
        return grouped_nt_matmul_te(xt, qw, qs, quant, n, k, transposed)

    return op.tensor_expr_op(compute, "dequantize_NT_matmul", [x, q_weight, q_scale])


def _word_lanes_nt_matmul(x: Tensor, q_weight: Tensor, q_scale: Tensor, quant: Quantization, n: int, k: int) -> Tensor:
    """:func:`word_lanes_nt_matmul_te` as one Relax op (its kernel is scheduled by ``cpu_schedule.WordLanesGEMV``)."""

    def compute(xt: te.Tensor, qw: te.Tensor, qs: te.Tensor) -> te.Tensor:
        return word_lanes_nt_matmul_te(xt, qw, qs, quant, n, k)

    return op.tensor_expr_op(compute, "dequantize_NT_matmul", [x, q_weight, q_scale])


def _int16_gemv(x: Tensor, q_weight: Tensor, q_scale: Tensor, quant: Quantization, n: int, k: int, transposed: bool) -> Tensor:
    """``NT_matmul`` of a 4-bit weight by ``cpu_gemv``'s VNNI kernel for its layout (float32 ``[B, 1, N]``)."""
    kernel = cpu_gemv.grouped_gemv_columns if transposed else cpu_gemv.grouped_gemv_rows
    func = kernel(k, n, quant.max_int, x.dtype, quant.model_dtype)
    return op.tensor_ir_op(func, "dequantize_NT_matmul_int16", [x, q_weight, q_scale], Tensor.placeholder((x.shape[0], 1, n), "float32"))


def _host_matmul(x: Tensor, w: Tensor, n: int, k: int) -> Tensor:
    """``NT_matmul`` of several tokens by a float ``[N, K]`` weight on the host: ``cpu_gemm``'s register-tiled kernel (float32)."""
    func = cpu_gemm.matmul_nt(k, n, x.dtype, w.dtype)
    return op.tensor_ir_op(func, "NT_matmul_tiled", [x, w], Tensor.placeholder((x.shape[0], x.shape[1], n), "float32"))


def _host_gemv(x: Tensor, w: Tensor, n: int, k: int) -> Tensor:
    """``NT_matmul`` of one token per sequence by a float ``[N, K]`` weight with long rows: ``cpu_gemm.gemv_nt`` (float32)."""
    func = cpu_gemm.gemv_nt(k, n, x.dtype, w.dtype)
    return op.tensor_ir_op(func, "NT_matmul_rows", [x, w], Tensor.placeholder((x.shape[0], 1, n), "float32"))


def _as_stored(ws: list[te.Tensor], i: Any, j: Any) -> tirx.PrimExpr:
    """``W[i, j]`` of a weight that is stored plainly ``[N, K]``."""
    return ws[0][i, j]


def _finish(y: Tensor, out_dtype: str, bias: nn.Parameter | None) -> Tensor:
    """The float32 sums cast to the layer's output dtype, plus its bias."""
    y = y.astype(out_dtype) if out_dtype != "float32" else y
    return y + bias if bias is not None else y


def _one_token_per_sequence(x: Tensor) -> bool:
    return isinstance(x.shape[1], int) and x.shape[1] == 1


class Linear(nn.Module):
    """An unquantized linear layer (``weight [N, K]``, optional ``bias``), as MLC names it."""

    def __init__(
        self, in_features: int, out_features: int, dtype: str, bias: bool, bias_dtype: str | None, out_dtype: str | None, host_matmul: bool
    ) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.out_dtype = out_dtype or dtype
        self.host_matmul = host_matmul and cpu_gemm.applies(in_features, out_features)
        self.host_gemv = host_matmul and cpu_gemm.gemv_applies(in_features, out_features, dtype, dtype)
        self.weight = nn.Parameter((out_features, in_features), dtype)
        self.bias = nn.Parameter((out_features,), bias_dtype or dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.host_matmul and not _one_token_per_sequence(x):
            y = _host_matmul(x, self.weight, self.out_features, self.in_features)
        elif self.host_gemv and _one_token_per_sequence(x):
            y = _host_gemv(x, self.weight, self.out_features, self.in_features)
        else:
            y = _nt_matmul(x, [self.weight], _as_stored, self.out_features, self.in_features, "NT_matmul")
        return _finish(y, self.out_dtype, self.bias)


class QLinear(nn.Module):
    """A linear layer stored as MLC group-quantized ``q_weight`` / ``q_scale`` (``_0`` or ``_1`` layout).

    The weight is unpacked inside the matmul (one read of 4-bit data) except for several tokens per
    sequence on the host CPU (``dequantize_rows``): there the CPU is compute-bound, so unpacking
    once per call beats unpacking per token row. That copy is in the model's dtype, rounded as MLC's
    dequantize rounds it: float16 halves the bytes written and read again (3.6 B shape q4f16_0,
    64-token prefill, one thread: 9.0 → 7.9 CPU s; float32 for ``q4f32_1``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        quant: Quantization,
        bias: bool,
        bias_dtype: str | None,
        out_dtype: str | None,
        dequantize_rows: bool,
        int16_dot: bool,
        host_matmul: bool,
    ) -> None:
        self.in_features, self.out_features, self.quant = in_features, out_features, quant
        self.out_dtype = out_dtype or quant.model_dtype
        self.dequantize_rows = dequantize_rows
        self.transposed = quant.layout_transposed(embedding=False)
        self.host_matmul = host_matmul and cpu_gemm.applies(in_features, out_features)
        self.int16_dot = int16_dot and cpu_gemv.applies(quant.bits, quant.elems_per_word, quant.group_size, in_features, out_features, self.transposed)
        kp = quant.padded_k(in_features)
        words, groups = kp // quant.elems_per_word, kp // quant.group_size
        if self.transposed:
            self.q_weight = nn.Parameter((words, out_features), "uint32")
            self.q_scale = nn.Parameter((groups, out_features), quant.model_dtype)
        else:
            self.q_weight = nn.Parameter((out_features, words), "uint32")
            self.q_scale = nn.Parameter((out_features, groups), quant.model_dtype)
        self.bias = nn.Parameter((out_features,), bias_dtype or quant.model_dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        n, k, quant = self.out_features, self.in_features, self.quant
        if self.dequantize_rows and not _one_token_per_sequence(x):
            w = _dequantize(self.q_weight, self.q_scale, quant, k, self.transposed, quant.model_dtype)
            y = _host_matmul(x, w, n, k) if self.host_matmul else _nt_matmul(x, [w], _as_stored, n, k, "NT_matmul")
        elif self.int16_dot and _one_token_per_sequence(x):
            y = _int16_gemv(x, self.q_weight, self.q_scale, quant, n, k, self.transposed)
        elif self.dequantize_rows and self.transposed and k % quant.group_size == 0 and quant.group_size % quant.elems_per_word == 0:
            y = _grouped_nt_matmul(x, self.q_weight, self.q_scale, quant, n, k, self.transposed)
        elif self.dequantize_rows and not self.transposed and k % quant.group_size == 0 and quant.group_size % quant.elems_per_word == 0:
            y = _word_lanes_nt_matmul(x, self.q_weight, self.q_scale, quant, n, k)
        else:

            def element(ws: list[te.Tensor], i: Any, j: Any) -> tirx.PrimExpr:
                return _weight_element(quant, ws[0], ws[1], i, j, self.transposed)

            y = _nt_matmul(x, [self.q_weight, self.q_scale], element, n, k, "dequantize_NT_matmul")
        return _finish(y, self.out_dtype, self.bias)


class QEmbedding(nn.Module):
    """Embedding stored group-quantized; rows are gathered first, then dequantized (always ``_1`` layout)."""

    def __init__(self, vocab: int, dim: int, quant: Quantization) -> None:
        self.dim, self.quant = dim, quant
        kp = quant.padded_k(dim)
        self.q_weight = nn.Parameter((vocab, kp // quant.elems_per_word), "uint32")
        self.q_scale = nn.Parameter((vocab, kp // quant.group_size), quant.model_dtype)

    def forward(self, ids: Tensor) -> Tensor:
        rows_w = op.take(self.q_weight, ids, axis=0)
        rows_s = op.take(self.q_scale, ids, axis=0)
        return _dequantize(rows_w, rows_s, self.quant, self.dim, self.quant.layout_transposed(embedding=True), self.quant.model_dtype)


def _linear(cfg: NeoXConfig, quant: Quantization, k: int, n: int, bias: bool = True, out_dtype: str | None = None) -> nn.Module:
    if quant.kind == "group-quant":
        return QLinear(k, n, quant, bias, out_dtype, out_dtype, cfg.dequantize_rows, cfg.int16_dot, cfg.host_matmul)
    return Linear(k, n, quant.model_dtype, bias, out_dtype, out_dtype, cfg.host_matmul)


class Attention(nn.Module):
    def __init__(self, cfg: NeoXConfig, quant: Quantization) -> None:
        self.cfg = cfg
        self.query_key_value = _linear(cfg, quant, cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = _linear(cfg, quant, cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        heads, hd = self.cfg.num_attention_heads, self.cfg.head_dim
        qkv = op.reshape(self.query_key_value(x), (b, s, 3 * heads, hd))
        out = cache.attention_with_fused_qkv(layer_id, qkv, heads, sm_scale=hd**-0.5)
        return self.dense(op.reshape(out, (b, s, heads * hd)))


def _gelu(x: Tensor, polynomial_erf: bool) -> Tensor:
    """Exact (erf) GELU; with ``polynomial_erf`` the erf is TVM's rational approximation (``topi.fast_erf``).

    Why: on the host CPU ``erf`` is a scalar libm call per element (~30 ns): 1.1 ms of a 162.5 M decode
    step, 145 ms of a 128-token prefill. The polynomial vectorises; its largest error against erf is
    4.2e-7 (GELU 9.1e-7), measured over [-6, 6] in float32.
    """
    if not polynomial_erf:
        return op.gelu(x)

    def compute(t: te.Tensor) -> te.Tensor:
        t32 = topi.cast(t, "float32") if t.dtype != "float32" else t
        e = topi.fast_erf(topi.multiply(t32, tirx.const(0.7071067811865476, "float32")))
        return te.compute(t.shape, lambda *i: (tirx.const(0.5, "float32") * t32(*i) * (tirx.const(1.0, "float32") + e(*i))).astype(t.dtype), name="gelu")

    return op.tensor_expr_op(compute, "gelu", [x])


class MLP(nn.Module):
    def __init__(self, cfg: NeoXConfig, quant: Quantization) -> None:
        self.dtype = quant.model_dtype
        self.polynomial_erf = cfg.polynomial_erf
        self.dense_h_to_4h = _linear(cfg, quant, cfg.hidden_size, cfg.intermediate_size, out_dtype=cfg.ffn_out_dtype)
        self.dense_4h_to_h = _linear(cfg, quant, cfg.intermediate_size, cfg.hidden_size, out_dtype=cfg.ffn_out_dtype)

    def forward(self, x: Tensor) -> Tensor:
        h = _gelu(self.dense_h_to_4h(x), self.polynomial_erf).astype(self.dtype)
        return self.dense_4h_to_h(h).astype(self.dtype)


class Layer(nn.Module):
    def __init__(self, cfg: NeoXConfig, quant: Quantization) -> None:
        self.parallel = cfg.use_parallel_residual
        dt, eps = quant.model_dtype, cfg.layer_norm_eps
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps, dtype=dt)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps, dtype=dt)
        self.attention = Attention(cfg, quant)
        self.mlp = MLP(cfg, quant)

    def forward(self, x: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        attn = self.attention(self.input_layernorm(x), cache, layer_id)
        if self.parallel:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: NeoXConfig, quant: Quantization) -> None:
        if quant.kind == "group-quant":
            self.embed_in = QEmbedding(cfg.vocab_size, cfg.hidden_size, quant)
        else:
            self.embed_in = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=quant.model_dtype)
        self.layers = nn.ModuleList([Layer(cfg, quant) for _ in range(cfg.num_hidden_layers)])
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=quant.model_dtype)

    def forward(self, x: Tensor, cache: PagedKVCache) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i)
        return self.final_layer_norm(x)


class GPTNeoXForCausalLM(nn.Module):
    """The model library's entry points (see module docstring)."""

    def __init__(self, cfg: NeoXConfig, quant: Quantization, target: Target) -> None:
        self.cfg, self.quant, self.target = cfg, quant, target
        self.dtype = quant.model_dtype
        self.gpt_neox = Backbone(cfg, quant)
        # float32 logits straight from the float32 accumulator (no float16 rounding of the logits)
        self.embed_out = _linear(cfg, quant, cfg.hidden_size, cfg.vocab_size, bias=False, out_dtype="float32")

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.gpt_neox.embed_in(input_ids)

    def prefill(self, input_embed: Tensor, paged_kv_cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        h = self.gpt_neox(input_embed, paged_kv_cache)

        def last(x: te.Tensor) -> te.Tensor:
            b, s, d = x.shape
            return te.compute((b, 1, d), lambda i, _, k: x[i, s - 1, k], name="index")

        h = op.tensor_expr_op(last, "index", [h])
        return self.embed_out(h), paged_kv_cache

    def decode(self, input_embed: Tensor, paged_kv_cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        return self.embed_out(self.gpt_neox(input_embed, paged_kv_cache)), paged_kv_cache

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        h = self.gpt_neox(input_embeds, paged_kv_cache)
        h = op.take(h, logit_positions, axis=1)
        return self.embed_out(h), paged_kv_cache

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        return self.embed_out(self.gpt_neox(input_embeds, paged_kv_cache)), paged_kv_cache

    def batch_verify(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        return self.embed_out(self.gpt_neox(input_embeds, paged_kv_cache)), paged_kv_cache

    def softmax_with_temperature(self, logits: Tensor, temperature: Tensor) -> Tensor:
        b, s, v = logits.shape
        t = op.maximum(op.reshape(temperature, (b, 1, 1)), op.full((b, 1, 1), 1e-5, "float32"))
        return op.softmax(logits / t, axis=-1)

    def alloc_embedding_tensor(self) -> Tensor:
        return op.zeros((self.cfg.prefill_chunk_size, self.cfg.hidden_size), self.dtype)

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        h, dt = self.cfg.hidden_size, self.dtype
        packed = {"param_mode": "packed", "effect_mode": "none"}
        none = {"param_mode": "none", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        spec = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", h], dt), "paged_kv_cache": kv, "$": packed},
            "decode": {"input_embed": nn.spec.Tensor([1, 1, h], dt), "paged_kv_cache": kv, "$": packed},
            "batch_prefill": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", h], dt),
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "batch_decode": {"input_embeds": nn.spec.Tensor(["batch_size", 1, h], dt), "paged_kv_cache": kv, "$": packed},
            "batch_verify": {"input_embeds": nn.spec.Tensor([1, "seq_len", h], dt), "paged_kv_cache": kv, "$": packed},
            "softmax_with_temperature": {
                "logits": nn.spec.Tensor(["batch_size", 1, "vocab_size"], "float32"),
                "temperature": nn.spec.Tensor(["batch_size"], "float32"),
                "$": none,
            },
            "alloc_embedding_tensor": {"$": none},
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)


KV_CACHE_ARGS = ("max_batch_size_", "max_total_seq_len_", "prefill_chunk_size_", "page_size_", "support_sliding_window_")


def add_kv_cache_creation(mod: Any, model: GPTNeoXForCausalLM) -> Any:
    """Add ``create_tir_paged_kv_cache(5 × int64)`` as MLC's libraries export it.

    Each argument is a one-element shape (MLC's runtime passes ``IntTuple{n}``), named with the
    trailing underscore MLC's libraries use.
    """
    from tvm import relax as rx
    from tvm.relax.type import ShapeType

    cfg = model.cfg
    tvars = [tirx.Var(n, "int64") for n in KV_CACHE_ARGS]
    params = [rx.Var(n, ShapeType(values=[v])) for n, v in zip(KV_CACHE_ARGS, tvars, strict=True)]
    bb = rx.BlockBuilder(mod)
    with bb.function("create_tir_paged_kv_cache", params):
        cache = TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=tvars[0],
            max_total_seq_len=tvars[1],
            prefill_chunk_size=tvars[2],
            page_size=tvars[3],
            support_sliding_window=tvars[4],
            layer_partition=rx.ShapeExpr([0, cfg.num_hidden_layers]),
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_attention_heads,
            qk_head_dim=cfg.head_dim,
            v_head_dim=cfg.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=cfg.position_embedding_base,
            rope_scaling={},
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=int(cfg.head_dim * cfg.rotary_pct),
            enable_disaggregation=False,
            dtype=model.dtype,
            target=model.target,
        )
        bb.emit_func_output(bb.emit(cache._expr))
    return bb.finalize()
