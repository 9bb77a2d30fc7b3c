"""The host (``llvm``) library's prefill matmul: several tokens against a float weight stored ``[N, K]``.

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
"""

from __future__ import annotations

import functools
from typing import Any

from tvm import tirx
from tvm.script import tirx as T

LANES = 16  # float32 lanes of an AVX-512 register (partial sums along K)
TOKENS = 4  # tokens of a register tile
ROWS = 4  # weight rows of a register tile (TOKENS × ROWS = 16 registers of sums)
BLOCK_ROWS = 64  # weight rows a task owns (6 × 4 and 4 × 6 tiles, 96 and 128 rows: within 5 %)
K_BLOCK = 3072  # longest reduction run at once: a task's rows stay in L2 (1536: 5 % slower at K 3072)


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


@functools.cache
def matmul_nt(k: int, n: int, x_dtype: str, w_dtype: str) -> tirx.PrimFunc:
    """``y[b, s, j] = Σ_k x[b, s, k] · w[j, k]`` in float32: ``x [B, S, K]``, ``w [N, K]``, ``y [B, S, N]``."""
    kb = k_block(k)
    blocks, chunks, groups = k // kb, kb // LANES, BLOCK_ROWS // ROWS

    def lane_sum(acc: tirx.Buffer, base: int) -> tirx.PrimExpr:
        """The 16 lanes from ``base`` added as a balanced tree."""
        parts = [acc[base + lane] for lane in range(LANES)]
        while len(parts) > 1:
            parts = [parts[i] + parts[i + len(parts) // 2] for i in range(len(parts) // 2)]
        return parts[0]

    @T.prim_func
    def matmul(x_handle: T.handle, w: T.Buffer((n, k), w_dtype), y_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch, seq = T.int64(), T.int64()
        x = T.match_buffer(x_handle, (batch, seq, k), x_dtype)
        y = T.match_buffer(y_handle, (batch, seq, n), "float32")
        for task in T.parallel(n // BLOCK_ROWS):
            acc = T.alloc_buffer((TOKENS * ROWS * LANES,), "float32", scope="local")
            xt = T.alloc_buffer((TOKENS, kb), "float32", scope="local")
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
                                y[m // seq, m % seq, j] = T.if_then_else(kbi == 0, T.float32(0), y[m // seq, m % seq, j]) + lane_sum(
                                    acc, (t * ROWS + r) * LANES
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
                            y[m // seq, m % seq, j] = T.if_then_else(kbi == 0, T.float32(0), y[m // seq, m % seq, j]) + lane_sum(acc, r * LANES)

    return matmul.without_attr("global_symbol")  # the model names it where it adds it
