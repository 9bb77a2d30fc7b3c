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

Work layout of :func:`grouped_gemv_columns` (``q4f16_0``: words ``[K/8, N]``, scales ``[K/32, N]``): tasks own ``panel`` consecutive
outputs × a range of groups (:func:`plan`). For each group, the four word rows are streamed across the
panel 64 outputs at a time (four registers of int32 sums; each row is read in pieces of the panel's
width, up to 16 KiB, which the hardware prefetcher follows, and the next group's rows are prefetched
into L2 one sweep ahead), then the group's sums are scaled and added to the task's partial row (in L1/L2); a
last parallel pass adds the partial rows of the K split. The batch loop is outermost in a task: inside
the panel sweep, LLVM hoisted a block's 64 unpacked code vectors out of it and spilled them to the stack
(3.6 B shape decode, one thread, 5.4 → 6.6 tok/s when moved).

3.6 B shape q4f16_0 decode, whole model, libraries alternating in one session (this host is noisy):
one thread 4.9–5.8 (float ``GroupedGEMV``) → 6.6–7.3 tok/s; two threads 8.3–9.9 → 11.0–12.2 tok/s.
Prefetching into L2 rather than L1 then gave one thread 7.0–7.8 → 8.8–10.1 tok/s (two: within noise).

The ``[N, K/8]`` (``_1``) layout has its own kernel, :func:`grouped_gemv_rows`: SIMD along K, ``x``
split into int8 halves for ``vpdpbusd``, four rows reduced together. A first version (``vpdpwssd``,
per-lane group scales spread by a shuffle, a horizontal sum per row) was slower than the float
``WordLanesGEMV`` (3.6 B q4f16_1 decode, one thread, 5.1 → 4.1 tok/s); this one, with its prefetch into
L2, gives two threads 9.1–9.9 → 13.8–14.5 tok/s.

Only the order of additions and the int16 rounding of ``x`` differ from the float kernels: tests hold
the kernel to numpy within that rounding's bound, and a q4f16_0 decode step to the float prefill's
logits within 5e-3 (MLC's conformance tolerance), for both layouts. Needs AVX-512 BW + VNNI (:func:`supported`); the
default host target adds ``+avx512vnni`` where the CPU has it (``compile.default_host_features``).
"""

from __future__ import annotations

import functools
from typing import Any

from tvm import DataType, tirx
from tvm.script import tirx as T

# The host CPU's caches, for the hand-written kernels (here, cpu_gemm, cpu_attention). They live here,
# not in cpu_schedule: weight conversion imports the model, and with it this module and cpu_gemm, but
# must not depend on the compiler's schedules (editing those reruns compile, never conversion).
CACHE_LINE = 64  # bytes
L1_BYTES = 32 * 1024  # L1 data cache of one core (Zen 4, most x86 cores since Skylake: 32–48 KiB)
# Software prefetches of weights go into L2: into L1 they displaced the activations (rows kernel
# streaming 9.3 → 16.2 GB/s a thread; 3.6 B q4f16_0 decode, one thread, 7.0 → 9.3 tok/s;
# cpu_gemm.gemv_nt, one thread, 17.8 GB/s into L1, 21.9 without prefetching, 27 into L2)
PREFETCH_LOCALITY = 2
# Scope of a parallel task's own small buffers (sums, a prepared group of x). TVM's LowerTVMBuiltin
# makes a constant CPU allocation under 1 KiB a stack array only in "global" scope: a "local" one is a
# TVMBackendAllocWorkspace call (a lock-free but linear search of a thread-local pool) and a free, made
# in every task, i.e. every 4 output rows. 162.5 M decode, one thread, CPU ms a step: q4f16_1 6.6 →
# 5.6, q4f16_0 5.8 → 5.3, q0f16 (cpu_schedule's GEMV) 10.6 → 9.5; the same instructions otherwise.
SCRATCH = "global"

GROUP = 32  # elements per activation group: the weights' quantization group
WORD_ELEMS = 8  # 4-bit codes per uint32 word
Q_MAX = 32767  # int16 activations: round(x / (max|x| / Q_MAX))
OUT_BLOCK = 64  # outputs whose int32 group sums stay in registers: 4 AVX-512 registers
LANES = 16  # int32 lanes of an AVX-512 register
PANEL_MAX = 4096  # widest panel of outputs a task sweeps (its partial row: 16 KiB of float32)
TASKS = 16  # at least this many parallel tasks where the K split allows (enough for 16 threads)
PREFETCH = True  # the next group's word rows, one panel sweep ahead (3.6 B decode, 2 threads, A/B: 9.9–12.6 → 11.0–12.2 tok/s, within noise)
VNNI = "llvm.x86.avx512.vpdpwssd.512"
BYTE_DOT = "llvm.x86.avx512.vpdpbusd.512"  # u8 × s8, four products a lane
SPLIT_MAX = 127 * 256 + 127  # rows kernel: int16 activations whose high byte stays an int8 once the low byte is taken signed
ROWS = 4  # rows kernel: output rows reduced together (one register of 4 groups × 4 rows)
CHUNK_WORDS = LANES  # rows kernel: words of a row per vector load (128 codes, 4 groups)
FEATURES = ("avx512bw", "avx512vnni")
# rows kernel, long rows: x's prepared data is 3 bytes a weight of K (4 bytes of int8 parts, a zero
# term and a scale per 8 codes); from L1_BYTES on (K 12288: 36 KiB) ROW_SETS × ROWS rows share each load of it
X_BYTES_PER_ELEM = 3
ROW_SETS = 2


def supported(target: Any) -> bool:
    """True when ``target`` is an x86 CPU with AVX-512 BW and VNNI (``vpdpwssd``)."""
    from tvm.target import codegen

    try:
        return target.kind.name == "llvm" and all(codegen.target_has_features(f, target) for f in FEATURES)
    except Exception:  # noqa: BLE001 - a target LLVM cannot query (another architecture): not supported
        return False


def applies(bits: int, elems_per_word: int, group_size: int, k: int, n: int, transposed: bool) -> bool:
    """Whether a layer's weight fits a kernel here: 4-bit codes in groups of 32, and either stored
    ``[K/8, N]`` (the ``_0`` layouts, :func:`grouped_gemv_columns`: whole blocks of outputs) or
    ``[N, K/8]`` (the ``_1`` layouts, :func:`grouped_gemv_rows`: whole 128-code chunks and row blocks)."""
    if not (bits == 4 and elems_per_word == WORD_ELEMS and group_size == GROUP and k % GROUP == 0):
        return False
    return n % OUT_BLOCK == 0 if transposed else k % (CHUNK_WORDS * WORD_ELEMS) == 0 and n % ROWS == 0


def row_sets(k: int, n: int) -> int:
    """Sets of ``ROWS`` rows a task of :func:`grouped_gemv_rows` runs side by side: two where ``x``'s prepared
    bytes (``X_BYTES_PER_ELEM`` a weight of K) would not stay in L1 beside one set's streamed words."""
    return ROW_SETS if k * X_BYTES_PER_ELEM >= L1_BYTES and n % (ROWS * ROW_SETS) == 0 else 1


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
            top = T.alloc_buffer((1,), "float32", scope=SCRATCH)
            total = T.alloc_buffer((1,), "int32", scope=SCRATCH)
            q = T.alloc_buffer((GROUP,), "int32", scope=SCRATCH)
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
            acc = T.alloc_buffer((OUT_BLOCK,), "int32", scope=SCRATCH)
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
                                        PREFETCH_LOCALITY,
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
            row = T.alloc_buffer((OUT_BLOCK,), "float32", scope=SCRATCH)
            for lane in T.vectorized(OUT_BLOCK):
                row[lane] = part[b, 0, c * OUT_BLOCK + lane]
            for si in T.serial(split - 1):
                for lane in T.vectorized(OUT_BLOCK):
                    row[lane] = row[lane] + part[b, si + 1, c * OUT_BLOCK + lane]
            for lane in T.vectorized(OUT_BLOCK):
                y[b, 0, c * OUT_BLOCK + lane] = row[lane]

    return gemv.without_attr("global_symbol")  # the model names it where it adds it



@functools.cache
def grouped_gemv_rows(k: int, n: int, max_int: int, x_dtype: str, scale_dtype: str) -> tirx.PrimFunc:
    """``y[b, 0, j] = Σ_k x[b, 0, k] · (code[j, k] - max_int) · scale[j, k // 32]`` for words stored ``[N, K/8]``.

    Arguments as the model passes them: ``x [B, 1, K]``, ``q_weight [N, K/8]`` uint32, ``q_scale
    [N, K/32]``; output ``[B, 1, N]`` float32. A row's words are contiguous, so SIMD runs along K: one
    load holds 16 words (128 codes, 4 groups) of a row. ``x`` is rounded to int16 per group as in
    :func:`grouped_gemv_columns` (scale ``max|x| / SPLIT_MAX``) and split into a signed low byte and a
    high byte (``q = 256·hi + lo``), so the codes can meet it with ``vpdpbusd`` (unsigned × signed bytes,
    four products a lane): masking a word with ``0x0F0F0F0F`` leaves its even codes as bytes, shifting
    it by 4 first its odd ones, and four ``vpdpbusd`` (even and odd codes × high and low bytes, the high
    sums shifted by 8 in between) give each lane its word's exact ``Σ code · q``. Two masks, a shift
    and four ``vpdpbusd`` per 128 weights, against ``vpdpwssd``'s three shift-and-masks per 32.

    Lanes then hold words, four to a group: four rows' registers are reduced together (two rounds of
    unpack and add) to one register of (group, row) sums, which gets the zero-point term and is scaled
    in one multiply-add by ``weight_scale[row, group] · x_scale[group]`` (the four rows' scales gathered
    by one shuffle). Rows run in parallel, ``ROWS`` at a time; the next block's words and scales are
    prefetched into L2 one block ahead (prefetched into L1 they displaced ``x``'s bytes: 9.3 GB/s a
    thread streaming from DRAM, against 16.2 into L2 and 15.5 for a plain read of the same memory).
    Where ``x``'s prepared data outgrows L1 (:func:`row_sets`: the 3.6 B MLP down, K 12288, 36 KiB) a task
    runs two sets of ``ROWS`` rows against each load of it: one thread, CPU ms a step, MLP down 39.4 →
    27.4 against MLP up's 35.0 → 26.2 (the same bytes); whole model, two threads, alternating: 15.3 /
    15.3 / 19.4 / 18.8 → 14.8 / 20.3 / 20.5 / 20.4 tok/s.
    """
    groups, words = k // GROUP, k // WORD_ELEMS
    subs = row_sets(k, n)
    task_rows = ROWS * subs
    chunks, blocks = words // CHUNK_WORDS, n // task_rows
    per_group = GROUP // WORD_ELEMS  # words of a group (= lanes of a group in a register)
    chunk_groups = CHUNK_WORDS // per_group
    nibbles = 0x0F0F0F0F
    scales_per_line = CACHE_LINE * 8 // DataType(scale_dtype).bits  # the next block's scales are prefetched a line a chunk
    # two rounds of unpack-and-add within each 128-bit quarter (one group): lanes (word, row) → (group, row)
    quarters = range(LANES // 4)
    lo32 = [4 * q + i for q in quarters for i in (0, LANES, 1, LANES + 1)]
    hi32 = [4 * q + i for q in quarters for i in (2, LANES + 2, 3, LANES + 3)]
    lo64 = [4 * q + i for q in quarters for i in (0, 1, LANES, LANES + 1)]
    hi64 = [4 * q + i for q in quarters for i in (2, 3, LANES + 2, LANES + 3)]
    scale_lanes = [r * chunk_groups + g for g in range(chunk_groups) for r in range(ROWS)]

    def byte_dot(acc: Any, codes: Any, x_bytes: Any) -> Any:
        return T.call_llvm_pure_intrin("int32x16", BYTE_DOT, acc, T.reinterpret("int8x64", codes), T.reinterpret("int8x64", x_bytes))

    def pair_sum(a: Any, b: Any, lo: list[int], hi: list[int]) -> Any:
        return T.Shuffle([a, b], lo) + T.Shuffle([a, b], hi)

    @T.prim_func
    def gemv(x_handle: T.handle, q_weight: T.Buffer((n, words), "uint32"), q_scale: T.Buffer((n, groups), scale_dtype), y_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch = T.int64()
        x = T.match_buffer(x_handle, (batch, 1, k), x_dtype)
        y = T.match_buffer(y_handle, (batch, 1, n), "float32")
        # x_bytes[b, p, w]: word w's four bytes of part p: low bytes of its even / odd elements (p 0 / 1),
        # high bytes (p 2 / 3); x_zero and x_scale per (group, row) lane, as the reduced sums lie
        x_bytes = T.alloc_buffer((batch, 4, words), "int32")
        x_zero = T.alloc_buffer((batch, words), "int32")
        x_scale = T.alloc_buffer((batch, words), "float32")
        for bg in T.parallel(batch * groups):
            b: T.let[T.int64] = bg // groups
            g: T.let[T.int64] = bg % groups
            top = T.alloc_buffer((1,), "float32", scope=SCRATCH)
            total = T.alloc_buffer((1,), "int32", scope=SCRATCH)
            part = T.alloc_buffer((4, GROUP), "int32", scope=SCRATCH)
            top[0] = T.float32(0)
            for r in T.serial(GROUP):
                top[0] = T.max(top[0], T.fabs(T.Cast("float32", x[b, 0, g * GROUP + r])))
            inv: T.let[T.float32] = T.if_then_else(top[0] > T.float32(0), T.float32(SPLIT_MAX) / top[0], T.float32(0))
            total[0] = 0
            for r in T.serial(GROUP):
                q: T.let[T.int32] = T.Cast("int32", T.round(T.Cast("float32", x[b, 0, g * GROUP + r]) * inv))
                total[0] = total[0] + q
                lo: T.let[T.int32] = T.bitwise_and(q + 128, 255) - 128
                part[r % 2, r // 2] = lo
                part[2 + r % 2, r // 2] = T.shift_right(q - lo, 8)
            for r in T.serial(per_group):
                x_zero[b, g * per_group + r] = total[0] * -max_int
                x_scale[b, g * per_group + r] = top[0] * T.float32(1.0 / SPLIT_MAX)
            for w, p in T.grid(per_group, 4):
                x_bytes[b, p, g * per_group + w] = T.bitwise_or(
                    T.bitwise_or(T.bitwise_and(part[p, w * 4], 255), T.shift_left(T.bitwise_and(part[p, w * 4 + 1], 255), 8)),
                    T.bitwise_or(T.shift_left(T.bitwise_and(part[p, w * 4 + 2], 255), 16), T.shift_left(part[p, w * 4 + 3], 24)),
                )
        for blk in T.parallel(blocks):
            acc = T.alloc_buffer((ROWS * LANES,), "int32", scope=SCRATCH)
            sums = T.alloc_buffer((subs * LANES,), "float32", scope=SCRATCH)
            for b in T.serial(batch):
                for s in T.unroll(subs):
                    sums[T.Ramp(s * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                for c in T.serial(chunks):
                    if blk + 1 < blocks:  # the next block's words and scales, into L2
                        for r in T.unroll(task_rows):
                            T.evaluate(T.call_intrin("void", "tirx.prefetch", T.address_of(q_weight[(blk + 1) * task_rows + r, c * CHUNK_WORDS]), 0, PREFETCH_LOCALITY, 1))
                        if c * scales_per_line < task_rows * groups:
                            T.evaluate(
                                T.call_intrin(
                                    "void",
                                    "tirx.prefetch",
                                    T.address_of(q_scale[(blk + 1) * task_rows + c * scales_per_line // groups, c * scales_per_line % groups]),
                                    0,
                                    PREFETCH_LOCALITY,
                                    1,
                                )
                            )
                    for s in T.unroll(subs):
                        for r in T.unroll(ROWS):
                            even: T.let[T.uint32x16] = T.bitwise_and(
                                q_weight[blk * task_rows + s * ROWS + r, T.Ramp(c * CHUNK_WORDS, 1, LANES)], T.Broadcast(T.uint32(nibbles), LANES)
                            )
                            odd: T.let[T.uint32x16] = T.bitwise_and(
                                T.shift_right(q_weight[blk * task_rows + s * ROWS + r, T.Ramp(c * CHUNK_WORDS, 1, LANES)], T.Broadcast(T.uint32(4), LANES)),
                                T.Broadcast(T.uint32(nibbles), LANES),
                            )
                            acc[T.Ramp(r * LANES, 1, LANES)] = T.shift_left(
                                byte_dot(
                                    byte_dot(T.Broadcast(T.int32(0), LANES), even, x_bytes[b, 2, T.Ramp(c * CHUNK_WORDS, 1, LANES)]),
                                    odd,
                                    x_bytes[b, 3, T.Ramp(c * CHUNK_WORDS, 1, LANES)],
                                ),
                                T.Broadcast(T.int32(8), LANES),
                            )
                            acc[T.Ramp(r * LANES, 1, LANES)] = byte_dot(
                                byte_dot(acc[T.Ramp(r * LANES, 1, LANES)], even, x_bytes[b, 0, T.Ramp(c * CHUNK_WORDS, 1, LANES)]),
                                odd,
                                x_bytes[b, 1, T.Ramp(c * CHUNK_WORDS, 1, LANES)],
                            )
                        sums[T.Ramp(s * LANES, 1, LANES)] = sums[T.Ramp(s * LANES, 1, LANES)] + T.Cast(
                            "float32x16",
                            pair_sum(
                                pair_sum(acc[T.Ramp(0, 1, LANES)], acc[T.Ramp(LANES, 1, LANES)], lo32, hi32),
                                pair_sum(acc[T.Ramp(2 * LANES, 1, LANES)], acc[T.Ramp(3 * LANES, 1, LANES)], lo32, hi32),
                                lo64,
                                hi64,
                            )
                            + x_zero[b, T.Ramp(c * CHUNK_WORDS, 1, LANES)],
                        ) * (
                            T.Cast("float32x16", T.Shuffle([q_scale[blk * task_rows + s * ROWS + r, T.Ramp(c * chunk_groups, 1, chunk_groups)] for r in range(ROWS)], scale_lanes))
                            * x_scale[b, T.Ramp(c * CHUNK_WORDS, 1, LANES)]
                        )
                for s, r in T.grid(subs, ROWS):
                    y[b, 0, blk * task_rows + s * ROWS + r] = (
                        sums[s * LANES + r] + sums[s * LANES + ROWS + r] + sums[s * LANES + 2 * ROWS + r] + sums[s * LANES + 3 * ROWS + r]
                    )

    return gemv.without_attr("global_symbol")
