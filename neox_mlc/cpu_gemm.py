"""The host (``llvm``) library's float-weight kernels on AVX-512: a weight stored ``[N, K]`` against
several tokens (:func:`matmul_nt`, prefill) or against one token per sequence whose rows are long
(:func:`gemv_nt`, decode).

Why: a 3.6 B prefill is ~90 % matmuls, and ``cpu_schedule.Matmul`` (one token per register tile)
converts each float16 weight vector for every token it meets: a convert and a load per multiply-add,
~70 GFLOP/s a thread where one Zen 4 core peaks near 110. Here a register tile holds ``TOKENS`` tokens
× ``ROWS`` weight rows (16 AVX-512 registers of float32 partial sums along K): each converted weight
vector is used ``TOKENS`` times and each token vector ``ROWS`` times, so a step is 4 weight loads and
converts, 4 token loads and 16 multiply-adds. Measured against ``Matmul`` on the same shapes (128
tokens, float16, two threads): K 3072 × N 3072 145.8 → 206.5 GFLOP/s; one thread, K 12288 × N 3072
68.9 → 98.3 and K 3072 × N 12288 74.4 → 105.1.

Work layout: tasks own ``BLOCK_ROWS`` consecutive weight rows (96 KiB–384 KiB of float16 for K up
to ``K_BLOCK``: they stay in L2 while every token passes). Within a task, for each block of K, the
tokens go ``TOKENS`` at a time: their float32 copy (``TOKENS × K_BLOCK``, at most 48 KiB) is made
once, then every group of ``ROWS`` rows runs against it; at the end of a block each of the 16 sums
is added across its lanes into ``y``. Tokens left over (``M mod TOKENS``) go one at a time.

Used for the host's multi-token matmuls: q0 weights as stored, and the 4-bit layers after
``dequantize_rows`` unpacked them to float16 (``gpt_neox_model.QLinear``). Only the order of the
float32 additions differs from the float kernels it replaces.

:func:`gemv_nt` is the decode GEMV of a q0 weight whose rows are too long for ``x`` and one row to
share L1 (:func:`gemv_applies`; the 3.6 B model's MLP down, K 12288). ``cpu_schedule.GEMV`` streams
one row at a time, so each weight line read meets a line of ``x`` that the row before has pushed out of
L1; one thread then read K 12288 × N 3072 float16 at 15 GB/s against 31 GB/s for K 3072 × N 12288
(K 6144: 32, K 8192: 20). Here a task runs ``GEMV_ROWS`` rows side by side (each ``x`` vector serves
all of them) and prefetches the next task block's lines into L2 as it goes. Same shape, weights out
of cache on huge pages, kernels alternating: one thread 15.1–15.5 → 26.3–28.4 GB/s; two threads, three
runs, 24.9 / 30.4 / 29.2 → 32.9 / 53.9 / 35.7 GB/s. 3.6 B q0f16 decode, one thread: MLP down 144 → 82
CPU ms a step (whole step 322 → 259).
"""

from __future__ import annotations

import functools
from typing import Any

from tvm import DataType, tirx
from tvm.script import tirx as T

from neox_mlc.cpu_gemv import CACHE_LINE, L1_BYTES, PREFETCH_LOCALITY, SCRATCH

LANES = 16  # float32 lanes of an AVX-512 register (partial sums along K)
TOKENS = 4  # tokens of a register tile
ROWS = 4  # weight rows of a register tile (TOKENS × ROWS = 16 registers of sums)
BLOCK_ROWS = 64  # weight rows a task owns (6 × 4 and 4 × 6 tiles, 96 and 128 rows: within 5 %)
K_BLOCK = 3072  # longest reduction run at once: a task's rows stay in L2 (1536: 5 % slower at K 3072)
GEMV_ROWS = 8  # gemv_nt: rows a task runs side by side, 2 registers of sums each (K 12288 × N 3072, one thread: 4, 8, 16 rows 24.8, 27.1, 19.3 GB/s)
GEMV_CHUNK = 32  # gemv_nt: elements of a row per step (one 64-byte line of float16)


def supported(target: Any) -> bool:
    """True when ``target`` is an x86 CPU with AVX-512 (16 float32 lanes and 32 registers: the tile's 16
    sums, 4 weight and 4 token vectors fit; with AVX2's 16 registers they would spill)."""
    from tvm.target import codegen

    try:
        return target.kind.name == "llvm" and codegen.target_has_features("avx512f", target)
    except Exception:  # noqa: BLE001 - a target LLVM cannot query (another architecture): not supported
        return False


def applies(k: int, n: int) -> bool:
    """Whether ``[N, K]`` fits: whole register vectors along K and whole task blocks of rows."""
    return k % LANES == 0 and n % BLOCK_ROWS == 0


def k_block(k: int) -> int:
    """The widest multiple of ``LANES`` ≤ ``K_BLOCK`` that divides ``k``."""
    return max(d for d in range(LANES, min(k, K_BLOCK) + 1, LANES) if k % d == 0)


def gemv_applies(k: int, n: int, x_dtype: str, w_dtype: str) -> bool:
    """Whether :func:`gemv_nt` serves a one-token ``[N, K]`` matmul: ``x`` and one weight row no longer fit
    L1 together, and the shape is whole steps of K and whole task blocks of rows."""
    row_bytes = k * (DataType(x_dtype).bits + DataType(w_dtype).bits) // 8
    return row_bytes >= L1_BYTES and k % GEMV_CHUNK == 0 and n % GEMV_ROWS == 0


def _lane_sum(acc: tirx.Buffer, base: int, count: int) -> tirx.PrimExpr:
    """``acc[base : base + count]`` added as a balanced tree."""
    parts = [acc[base + lane] for lane in range(count)]
    while len(parts) > 1:
        parts = [parts[i] + parts[i + len(parts) // 2] for i in range(len(parts) // 2)]
    return parts[0]


@functools.cache
def gemv_nt(k: int, n: int, x_dtype: str, w_dtype: str) -> tirx.PrimFunc:
    """``y[b, 0, j] = Σ_k x[b, 0, k] · w[j, k]`` in float32 for one token per sequence: ``x [B, 1, K]``,
    ``w [N, K]``, ``y [B, 1, N]``. Tasks own ``GEMV_ROWS`` rows (see the module docstring)."""
    blocks, chunks, halves = n // GEMV_ROWS, k // GEMV_CHUNK, GEMV_CHUNK // LANES
    lines = max(1, GEMV_CHUNK * DataType(w_dtype).bits // 8 // CACHE_LINE)  # weight lines a row's step covers
    line_elems = GEMV_CHUNK // lines

    @T.prim_func
    def gemv(x_handle: T.handle, w: T.Buffer((n, k), w_dtype), y_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch = T.int64()
        x = T.match_buffer(x_handle, (batch, 1, k), x_dtype)
        y = T.match_buffer(y_handle, (batch, 1, n), "float32")
        for blk in T.parallel(blocks):
            acc = T.alloc_buffer((GEMV_ROWS * GEMV_CHUNK,), "float32", scope=SCRATCH)
            for b in T.serial(batch):
                for i in T.unroll(GEMV_ROWS * halves):
                    acc[T.Ramp(i * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                for c in T.serial(chunks):
                    if blk + 1 < blocks:  # the next block's lines at this step, into L2
                        for r, line in T.grid(GEMV_ROWS, lines):
                            T.evaluate(
                                T.call_intrin("void", "tirx.prefetch", T.address_of(w[(blk + 1) * GEMV_ROWS + r, c * GEMV_CHUNK + line * line_elems]), 0, PREFETCH_LOCALITY, 1)
                            )
                    for h in T.unroll(halves):
                        xv: T.let[T.float32x16] = T.Cast("float32x16", x[b, 0, T.Ramp(c * GEMV_CHUNK + h * LANES, 1, LANES)])
                        for r in T.unroll(GEMV_ROWS):
                            acc[T.Ramp((r * halves + h) * LANES, 1, LANES)] = (
                                acc[T.Ramp((r * halves + h) * LANES, 1, LANES)]
                                + T.Cast("float32x16", w[blk * GEMV_ROWS + r, T.Ramp(c * GEMV_CHUNK + h * LANES, 1, LANES)]) * xv
                            )
                for r in T.unroll(GEMV_ROWS):
                    y[b, 0, blk * GEMV_ROWS + r] = _lane_sum(acc, r * GEMV_CHUNK, GEMV_CHUNK)

    return gemv.without_attr("global_symbol")  # the model names it where it adds it


@functools.cache
def matmul_nt(k: int, n: int, x_dtype: str, w_dtype: str) -> tirx.PrimFunc:
    """``y[b, s, j] = Σ_k x[b, s, k] · w[j, k]`` in float32: ``x [B, S, K]``, ``w [N, K]``, ``y [B, S, N]``."""
    kb = k_block(k)
    blocks, chunks, groups = k // kb, kb // LANES, BLOCK_ROWS // ROWS

    @T.prim_func
    def matmul(x_handle: T.handle, w: T.Buffer((n, k), w_dtype), y_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch, seq = T.int64(), T.int64()
        x = T.match_buffer(x_handle, (batch, seq, k), x_dtype)
        y = T.match_buffer(y_handle, (batch, seq, n), "float32")
        for task in T.parallel(n // BLOCK_ROWS):
            acc = T.alloc_buffer((TOKENS * ROWS * LANES,), "float32", scope=SCRATCH)
            xt = T.alloc_buffer((TOKENS, kb), "float32", scope=SCRATCH)
            for kbi in T.serial(blocks):
                for tile in T.serial(batch * seq // TOKENS):
                    for t, c in T.grid(TOKENS, chunks):
                        m: T.let[T.int64] = tile * TOKENS + t
                        xt[t, T.Ramp(c * LANES, 1, LANES)] = T.Cast("float32x16", x[m // seq, m % seq, T.Ramp(kbi * kb + c * LANES, 1, LANES)])
                    for g in T.serial(groups):
                        for i in T.unroll(TOKENS * ROWS):
                            acc[T.Ramp(i * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                        for c in T.serial(chunks):
                            for r in T.unroll(ROWS):
                                for t in T.unroll(TOKENS):
                                    acc[T.Ramp((t * ROWS + r) * LANES, 1, LANES)] = (
                                        acc[T.Ramp((t * ROWS + r) * LANES, 1, LANES)]
                                        + T.Cast("float32x16", w[task * BLOCK_ROWS + g * ROWS + r, T.Ramp(kbi * kb + c * LANES, 1, LANES)])
                                        * xt[t, T.Ramp(c * LANES, 1, LANES)]
                                    )
                        for t in T.unroll(TOKENS):
                            for r in T.unroll(ROWS):
                                m: T.let[T.int64] = tile * TOKENS + t
                                j: T.let[T.int32] = task * BLOCK_ROWS + g * ROWS + r
                                y[m // seq, m % seq, j] = T.if_then_else(kbi == 0, T.float32(0), y[m // seq, m % seq, j]) + _lane_sum(
                                    acc, (t * ROWS + r) * LANES, LANES
                                )
                for rest in T.serial(batch * seq % TOKENS):  # the tokens left over, one at a time
                    m: T.let[T.int64] = batch * seq // TOKENS * TOKENS + rest
                    for c in T.serial(chunks):
                        xt[0, T.Ramp(c * LANES, 1, LANES)] = T.Cast("float32x16", x[m // seq, m % seq, T.Ramp(kbi * kb + c * LANES, 1, LANES)])
                    for g in T.serial(groups):
                        for r in T.unroll(ROWS):
                            acc[T.Ramp(r * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                        for c in T.serial(chunks):
                            for r in T.unroll(ROWS):
                                acc[T.Ramp(r * LANES, 1, LANES)] = (
                                    acc[T.Ramp(r * LANES, 1, LANES)]
                                    + T.Cast("float32x16", w[task * BLOCK_ROWS + g * ROWS + r, T.Ramp(kbi * kb + c * LANES, 1, LANES)])
                                    * xt[0, T.Ramp(c * LANES, 1, LANES)]
                                )
                        for r in T.unroll(ROWS):
                            j: T.let[T.int32] = task * BLOCK_ROWS + g * ROWS + r
                            y[m // seq, m % seq, j] = T.if_then_else(kbi == 0, T.float32(0), y[m // seq, m % seq, j]) + _lane_sum(acc, r * LANES, LANES)

    return matmul.without_attr("global_symbol")  # the model names it where it adds it
