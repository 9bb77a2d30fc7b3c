"""Integer-dot-product GEMV for the host (``llvm``) library's decode: 4-bit codes × int16 activations.

Why: after the weight-streaming fixes, a 3.6 B decode step on the host was bound by the instructions
that unpack each 4-bit weight as much as by memory — a mask, a convert to float and a multiply-add
for every weight (``gpt_neox_model.grouped_nt_matmul_te``), ~30 ps a weight in L2 on one Zen 4 core.
AVX-512 VNNI's ``vpdpwssd`` multiplies 32 pairs of int16 and adds each pair's two products into 16
int32 sums in one instruction. A 32-bit word of 4-bit codes, shifted right by ``4e`` and masked with
``0x000F000F``, holds code ``e`` in its low int16 and code ``e + 4`` in its high one: so a shift, a
mask and one ``vpdpwssd`` handle two weights of each of 16 outputs (C microbenchmark of the same
layout in L2: 17.5 vs 30.1 ps a weight).

Activations are quantized per group of 32 (the weights' group) to int16 with the scale
``max|x| / 32767``: the rounding error is at most ``max|x| / 65534`` per element — 2^-16 of the
group's largest value, below float16's own rounding of ``x`` (2^-11 of each value). The zero point
is folded into the starting sum (``-max_int · Σ q``), so each group's integer sum is exactly
``Σ (code - max_int) · q`` (|sum| < 2^23, exact in float32) and is scaled once by
``weight_scale · x_scale``. This is llama.cpp's approach (activations quantized per block, integer
dot products) with int16 instead of int8 activations: int8 would lose 2^-8 of the group maximum,
int16 keeps the library within the same tolerance of MLC's logits as the float kernels.

Work layout (``q4f16_0``: words ``[K/8, N]``, scales ``[K/32, N]``): tasks own ``panel`` consecutive
outputs × a range of groups (:func:`plan`). For each group, the four word rows are streamed across the
panel 64 outputs at a time (four registers of int32 sums; each row is read in pieces of the panel's
width, up to 16 KiB, which the hardware prefetcher follows, and the next group's rows are prefetched
one sweep ahead), then the group's sums are scaled and added to the task's partial row (in L1/L2); a
last parallel pass adds the partial rows of the K split. The batch loop is outermost in a task: inside
the panel sweep, LLVM hoisted a block's 64 unpacked code vectors out of it and spilled them to the stack
(3.6 B shape decode, one thread, 5.4 → 6.6 tok/s when moved).

3.6 B shape q4f16_0 decode, whole model, libraries alternating in one session (this host is noisy):
one thread 4.9–5.8 (float ``GroupedGEMV``) → 6.6–7.3 tok/s; two threads 8.3–9.9 → 11.0–12.2 tok/s.
The same kernel for the ``[N, K/8]`` (``_1``) layout — SIMD along K, per-lane group scales spread by a
shuffle, a horizontal sum per row — was slower than ``WordLanesGEMV`` (3.6 B q4f16_1 decode, one
thread, 5.1 → 4.1 tok/s: the per-row work dominates rows of 3072) and is not used.

Only the order of additions and the int16 rounding of ``x`` differ from the float kernels: tests hold
the kernel to numpy within that rounding's bound, and a q4f16_0 decode step to the float prefill's
logits within 5e-3 (MLC's conformance tolerance). Needs AVX-512 BW + VNNI (:func:`supported`); the
default host target adds ``+avx512vnni`` where the CPU has it (``compile.default_host_features``).
"""

from __future__ import annotations

import functools
from typing import Any

from tvm import tirx
from tvm.script import tirx as T

GROUP = 32  # elements per activation group: the weights' quantization group
WORD_ELEMS = 8  # 4-bit codes per uint32 word
Q_MAX = 32767  # int16 activations: round(x / (max|x| / Q_MAX))
OUT_BLOCK = 64  # outputs whose int32 group sums stay in registers: 4 AVX-512 registers
LANES = 16  # int32 lanes of an AVX-512 register
PANEL_MAX = 4096  # widest panel of outputs a task sweeps (its partial row: 16 KiB of float32)
TASKS = 16  # at least this many parallel tasks where the K split allows (enough for 16 threads)
CACHE_LINE = 64  # bytes
PREFETCH = True  # the next group's word rows, one panel sweep ahead (3.6 B decode, 2 threads, A/B: 9.9–12.6 → 11.0–12.2 tok/s, within noise)
VNNI = "llvm.x86.avx512.vpdpwssd.512"
FEATURES = ("avx512bw", "avx512vnni")


def supported(target: Any) -> bool:
    """True when ``target`` is an x86 CPU with AVX-512 BW and VNNI (``vpdpwssd``)."""
    from tvm.target import codegen

    try:
        return target.kind.name == "llvm" and all(codegen.target_has_features(f, target) for f in FEATURES)
    except Exception:  # noqa: BLE001 - a target LLVM cannot query (another architecture): not supported
        return False


def applies(bits: int, elems_per_word: int, group_size: int, k: int, n: int, transposed: bool) -> bool:
    """Whether a layer's weight fits :func:`grouped_gemv_columns`: stored ``[K/8, N]`` (the ``_0``
    layouts), 4-bit codes in groups of 32, whole blocks of outputs."""
    return transposed and bits == 4 and elems_per_word == WORD_ELEMS and group_size == GROUP and k % GROUP == 0 and n % OUT_BLOCK == 0


def plan(k: int, n: int) -> tuple[int, int]:
    """``(panel, k_split)``: outputs per task (the widest multiple of ``OUT_BLOCK`` ≤ ``PANEL_MAX`` that
    divides ``n``) and how many ways the groups are split (the fewest giving ``TASKS`` tasks)."""
    blocks, groups = n // OUT_BLOCK, k // GROUP
    panel = OUT_BLOCK * max(d for d in range(1, PANEL_MAX // OUT_BLOCK + 1) if blocks % d == 0)
    panels = n // panel
    split = next((s for s in range(1, groups + 1) if groups % s == 0 and panels * s >= TASKS), groups)
    return panel, split


@functools.cache  # one kernel per layer shape: a 3.6 B model has 121 such layers and 5 shapes (TVMScript parse 0.09 s each)
def grouped_gemv_columns(k: int, n: int, max_int: int, x_dtype: str, scale_dtype: str) -> tirx.PrimFunc:
    """``y[b, 0, j] = Σ_k x[b, 0, k] · (code[k, j] - max_int) · scale[k // 32, j]`` for words stored ``[K/8, N]``.

    Arguments as the model passes them: ``x [B, 1, K]``, ``q_weight [K/8, N]`` uint32, ``q_scale
    [K/32, N]``; output ``[B, 1, N]`` float32 (the layer's cast and bias follow, as for the float kernels).
    """
    panel, split = plan(k, n)
    groups, words = k // GROUP, k // WORD_ELEMS
    per_task, panels, blocks = groups // split, n // panel, panel // OUT_BLOCK
    regs = OUT_BLOCK // LANES
    pairs = WORD_ELEMS // 2  # (code e, code e + 4) pairs per word
    rows = GROUP // WORD_ELEMS  # word rows per group
    mask = (0xF << 16) | 0xF

    @T.prim_func
    def gemv(x_handle: T.handle, q_weight: T.Buffer((words, n), "uint32"), q_scale: T.Buffer((groups, n), scale_dtype), y_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch = T.int64()
        x = T.match_buffer(x_handle, (batch, 1, k), x_dtype)
        y = T.match_buffer(y_handle, (batch, 1, n), "float32")
        # x quantized per group: pairs (q[8w + e] low, q[8w + e + 4] high) as int32, the group's
        # zero-point term and its scale
        x_pair = T.alloc_buffer((batch, words * pairs), "int32")
        x_zero = T.alloc_buffer((batch, groups), "int32")
        x_scale = T.alloc_buffer((batch, groups), "float32")
        part = T.alloc_buffer((batch, split, n), "float32")
        for bg in T.parallel(batch * groups):
            b: T.let[T.int64] = bg // groups
            g: T.let[T.int64] = bg % groups
            top = T.alloc_buffer((1,), "float32", scope="local")
            total = T.alloc_buffer((1,), "int32", scope="local")
            q = T.alloc_buffer((GROUP,), "int32", scope="local")
            top[0] = T.float32(0)
            for r in T.serial(GROUP):
                top[0] = T.max(top[0], T.fabs(T.Cast("float32", x[b, 0, g * GROUP + r])))
            inv: T.let[T.float32] = T.if_then_else(top[0] > T.float32(0), T.float32(Q_MAX) / top[0], T.float32(0))
            x_scale[b, g] = top[0] * T.float32(1.0 / Q_MAX)
            total[0] = 0
            for r in T.serial(GROUP):
                q[r] = T.Cast("int32", T.round(T.Cast("float32", x[b, 0, g * GROUP + r]) * inv))
                total[0] = total[0] + q[r]
            x_zero[b, g] = total[0] * -max_int
            for w in T.serial(rows):
                for e in T.serial(pairs):
                    x_pair[b, (g * rows + w) * pairs + e] = T.bitwise_or(
                        T.bitwise_and(q[w * WORD_ELEMS + e], 0xFFFF), T.shift_left(q[w * WORD_ELEMS + e + pairs], 16)
                    )
        for task in T.parallel(split * panels):
            s: T.let[T.int32] = task // panels
            j0: T.let[T.int32] = task % panels * panel
            acc = T.alloc_buffer((OUT_BLOCK,), "int32", scope="local")
            for b, gi in T.grid(batch, per_task):  # batch outermost: LLVM would hoist a row's unpacked codes out of a batch loop, spilled
                g: T.let[T.int32] = s * per_task + gi
                for blk in T.serial(blocks):
                    if PREFETCH and gi + 1 < per_task:  # the next group's rows, one panel sweep ahead
                        for w in T.unroll(rows):
                            for line in T.unroll(OUT_BLOCK * 4 // CACHE_LINE):
                                T.evaluate(
                                    T.call_intrin(
                                        "void",
                                        "tirx.prefetch",
                                        T.address_of(q_weight[(g + 1) * rows + w, j0 + blk * OUT_BLOCK + line * (CACHE_LINE // 4)]),
                                        0,
                                        3,
                                        1,
                                    )
                                )
                    for i in T.unroll(regs):
                        acc[T.Ramp(i * LANES, 1, LANES)] = T.Broadcast(x_zero[b, g], LANES)
                    for w in T.unroll(rows):
                        for e in T.unroll(pairs):
                            for i in T.unroll(regs):
                                acc[T.Ramp(i * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                                    "int32x16",
                                    VNNI,
                                    acc[T.Ramp(i * LANES, 1, LANES)],
                                    T.reinterpret(
                                        "int16x32",
                                        T.bitwise_and(
                                            T.shift_right(
                                                q_weight[g * rows + w, T.Ramp(j0 + blk * OUT_BLOCK + i * LANES, 1, LANES)],
                                                T.Broadcast(T.Cast("uint32", e * 4), LANES),
                                            ),
                                            T.Broadcast(T.uint32(mask), LANES),
                                        ),
                                    ),
                                    T.reinterpret("int16x32", T.Broadcast(x_pair[b, (g * rows + w) * pairs + e], LANES)),
                                )
                    for i in T.unroll(regs):
                        part[b, s, T.Ramp(j0 + blk * OUT_BLOCK + i * LANES, 1, LANES)] = T.if_then_else(
                            gi == 0, T.Broadcast(T.float32(0), LANES), part[b, s, T.Ramp(j0 + blk * OUT_BLOCK + i * LANES, 1, LANES)]
                        ) + T.Cast("float32x16", acc[T.Ramp(i * LANES, 1, LANES)]) * (
                            T.Cast("float32x16", q_scale[g, T.Ramp(j0 + blk * OUT_BLOCK + i * LANES, 1, LANES)])
                            * T.Broadcast(x_scale[b, g], LANES)
                        )
        for bc in T.parallel(batch * (n // OUT_BLOCK)):
            b: T.let[T.int64] = bc // (n // OUT_BLOCK)
            c: T.let[T.int64] = bc % (n // OUT_BLOCK)
            row = T.alloc_buffer((OUT_BLOCK,), "float32", scope="local")
            for lane in T.vectorized(OUT_BLOCK):
                row[lane] = part[b, 0, c * OUT_BLOCK + lane]
            for si in T.serial(split - 1):
                for lane in T.vectorized(OUT_BLOCK):
                    row[lane] = row[lane] + part[b, si + 1, c * OUT_BLOCK + lane]
            for lane in T.vectorized(OUT_BLOCK):
                y[b, 0, c * OUT_BLOCK + lane] = row[lane]

    return gemv.without_attr("global_symbol")  # the model names it where it adds it

