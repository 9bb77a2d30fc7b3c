"""Schedules for the host (``llvm``) library: TVM 0.26's CPU pipeline leaves every kernel unscheduled.

Unscheduled means one thread, one scalar accumulator, and no reuse of what was loaded. The rules here
are dlight rules, tried in order on each fused kernel:

* :class:`GEMV` — one token per sequence (decode, last-token logits): each output row is a dot
  product over the stored weight row. Rows run in parallel; the reduction is split into
  ``GEMV_LANES`` independent float32 partial sums kept in registers (rfactor + unroll), which
  LLVM's SLP vectoriser turns into SIMD over K. A weight stored ``[K, N]`` (the ``_0`` layouts)
  is instead split over K: each parallel task owns ``SPLIT_ROWS`` consecutive rows of packed words
  (a few contiguous memory streams the hardware prefetcher follows, instead of one 1 KiB piece of
  every row of K) and sweeps them across N (each row whole when N is small), ``LANES`` unpacked weights per loaded word
  accumulated into explicit 8-wide SIMD sums; a second, small pass adds the tasks' partial rows.
  Epilogues (bias, residual, casts) are computed in that pass.
* :class:`GroupedGEMV` — one token against a ``[K, N]`` group-quantized weight, as the model writes it
  for the host (``gpt_neox_model.grouped_nt_matmul_te``: codes meet ``x`` unscaled, each group's sum is
  scaled once). Split over K like the GEMV above; the group sums of ``SIMD``-multiple outputs stay in
  registers, so a weight costs a mask, a convert and a multiply-add.
* :class:`WordLanesGEMV` — one token against a ``[N, K]`` group-quantized weight (the ``_1`` layouts;
  ``gpt_neox_model.word_lanes_nt_matmul_te``): SIMD along K, one vector of consecutive words per
  step against ``x`` de-interleaved once per call, rows in parallel.
* :class:`Matmul` — several tokens (prefill): a task holds ``NR`` weight rows in cache and runs
  every token against them, ``NR`` rows × ``LANES`` partial sums in registers, so each loaded token
  vector is used ``NR`` times. On AVX-512 targets the model hands these matmuls to
  ``neox_mlc/cpu_gemm.py`` instead (tokens tiled too: ~1.4× the throughput); this rule serves the rest.
* :class:`ParallelSpatial` — elementwise kernels (dequantize, rope, casts): parallel over rows.
* :class:`ParallelReductions` — any other reduction (layer norm, softmax): parallel over rows with
  split accumulators.

Every rule changes the order of float32 additions only (tests hold the library to the same
tolerances against transformers and MLC's own logits); a kernel a rule cannot handle falls through
to the next rule and, at worst, stays unscheduled and correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule

from neox_mlc.cpu_gemv import SCRATCH

LANES = 8  # Matmul: float32 partial sums per output, one AVX2 register
GEMV_LANES = 32  # GEMV: four AVX2 registers, so consecutive FMAs do not wait on each other
ROWS_PER_TASK = 16  # GEMV output rows per parallel task
# GEMV over a weight stored [K, N]: outputs swept together per packed word, widest that divides N
# (162 M q4f16_0 decode, 2 threads: 32 → 38, 256 → 67 tok/s).
OUTER_WIDTHS = (256, 128, 64, 32)
# GEMV over [K, N], split over K: packed-word rows per task. One step of the 162 M q4f16_0 model's
# output head (K 768, N 50432, one thread, weights out of cache): 5.8 ms swept by column blocks,
# 3.4 ms split over K (kernel alone; the whole model before/after: docs/benchmarks/runtime-decode-profile-gemv.json).
SPLIT_ROWS = 8
# ... and up to this many outputs, a task sweeps each word row whole (its partial row, 16 KiB, stays in
# L1): 162 M MLP down (K 3072, N 768) 0.32 → 0.19 ms; wider rows go in OUTER_WIDTHS blocks (head: 3.4 vs 4.0 ms).
WHOLE_ROW_MAX = 4096
# GroupedGEMV: wider rows are swept in the widest of these blocks that divides N, so each word row is
# read in pieces of at least a 4 KiB page where N allows: 3.6 B shape q4f16_0 decode, one thread, CPU
# ms a step: 330 → 167 (MLP up, N 12288: 114 → 46; QKV, N 9216: 86 → 38; head, N 51200: 15 → 7).
STREAM_WIDTHS = (4096, 2048, 1024, *OUTER_WIDTHS)
SIMD = 8  # float32 lanes of one AVX2 register: the explicitly vectorised loop over outputs
# GroupedGEMV: groups of K per parallel task, and outputs whose group sums stay in registers: 4 AVX-512
# registers or 2 AVX2 ones (162.5 M q4f16_0, CPU ms of one decode step's matmuls, one thread: AVX2 8 →
# 16 → 32 outputs 10.2 → 8.5 → 9.0; AVX-512 32 → 64 outputs 6.8 → 6.4).
GROUPS_PER_TASK = 2  # at least; more while that leaves GROUPED_TASKS tasks (fewer partial rows to add up)
GROUPED_TASKS = 16  # enough for 16 threads (162.5 M, K 3072: 48 → 16 tasks, MLP down 2.10 → 1.77 CPU ms a step)
GROUP_REGISTERS = {16: 4, 8: 2}  # float32 lanes of the target's widest register -> registers of sums
NR = 8  # Matmul register tile: weight rows × LANES partial sums per token (8 AVX2 registers)
K_BLOCK = 768  # Matmul: longer reductions are blocked (162.5 M MLP down, K 3072: 155 → 104 ms a prefill)
CHUNK = 16  # generic reduction rows per parallel task
# Elementwise kernels that read a buffer across its rows (q4f16_0's dequantize: words [K/8, N] in,
# [N, K] out) take this many output rows per step, so each word row's cache line serves 16 outputs
# before the next (3.6 B shape, 64-token prefill, one thread: dequantize 1.51 → 0.80 CPU s).
TRANSPOSE_ROWS = 16
SPATIAL_CHUNK = 1024  # elementwise kernels: elements per parallel task


def simd_lanes(target: Any) -> int:
    """float32 lanes of the target CPU's widest vector register (16 with AVX-512, else 8)."""
    from tvm.target import codegen

    try:
        return 16 if codegen.target_has_features("avx512f", target) else 8
    except Exception:  # noqa: BLE001 - a target LLVM cannot query: AVX2's width, correct everywhere
        return 8


def _fused(sch: Any, loops: list[Any]) -> Any:
    """One loop over ``loops`` (the loop itself when there is only one)."""
    return sch.fuse(*loops) if len(loops) > 1 else loops[0]


def _static(extent: Any) -> int | None:
    return int(extent) if isinstance(extent, (int, tirx.IntImm)) else None


@dataclass
class _MatmulParts:
    """A kernel shaped ``one reduction over K → [injective epilogues]``."""

    block: Any  # the reduction block
    rows: int | None  # product of the spatial extents before N (None when dynamic)
    n: int
    k: int
    inner: bool  # the dominant operand is stored with K contiguous ([N, K])
    epilogues: list[Any]


def _vars_in(expr: Any) -> set[Any]:
    found: set[Any] = set()
    tirx.stmt_functor.post_order_visit(expr, lambda e: found.add(e) if isinstance(e, tirx.Var) else None)
    return found


def _matmul_parts(sch: Any) -> _MatmulParts | None:
    """Recognise ``y[..., n] = Σ_k a[..., k] · w(n, k)``, optionally followed by fused epilogues."""
    infos = normalize_prim_func(sch)
    if not infos:
        return None
    info, epilogues = infos[0], infos[1:]
    if not info.is_reduction() or not all(x.is_injective() for x in epilogues):
        return None
    kinds = info.dom_kind()
    if kinds.count("R") != 1 or not kinds.endswith("SR"):
        return None
    iters = info.iters
    n, k = _static(iters[-2].dom), _static(iters[-1].dom)
    if n is None or k is None:
        return None
    rows: int | None = 1
    for it in iters[:-2]:
        extent = _static(it.dom)
        rows = None if extent is None or rows is None else rows * extent
    block = sch.get(info.block_rv)
    n_var, k_var = block.iter_vars[-2].var, block.iter_vars[-1].var
    weights = []
    for region in block.reads:
        used = set()
        for rng in region.region:
            used |= _vars_in(rng.min)
        if n_var in used and k_var in used:
            size = 1
            for d in region.buffer.shape:
                size *= _static(d) or 0
            last = _vars_in(region.region[-1].min)
            weights.append((size, k_var in last))
    if not weights:
        return None
    inner = max(weights)[1]
    return _MatmulParts(info.block_rv, rows, n, k, inner, [x.block_rv for x in epilogues])


def _outer_width(n: int, widths: tuple[int, ...] = OUTER_WIDTHS) -> int | None:
    """The widest of ``widths`` that divides ``n``."""
    return next((w for w in widths if n % w == 0), None)


def _attach_epilogues(sch: Any, epilogues: list[Any], loop: Any) -> None:
    for epi in _movable_epilogues(sch, epilogues, loop):
        try:
            sch.reverse_compute_at(epi, loop, preserve_unit_loops=True)
        except Exception:  # noqa: BLE001 - an epilogue that cannot move stays a separate loop, correct
            return


def _movable_epilogues(sch: Any, epilogues: list[Any], loop: Any) -> list[Any]:
    """The epilogues that may move under the kernel's parallel ``loop``, in order.

    An epilogue that reads nothing made under ``loop`` (e.g. another layer's output plus its bias, fused
    in because a later block adds both) would be computed whole by every task, and a block after it
    would then be given the whole output range per task, reading rows other tasks have not written yet
    (a race: NaN logits in a q4f16_1 decode). Such an epilogue is inlined into its consumer instead;
    where it cannot be, it and every epilogue after it stay separate loops after the kernel.
    """
    made = [w.buffer for b in sch.get_child_blocks(loop) for w in sch.get(b).writes]
    movable = []
    for epi in epilogues:
        stmt = sch.get(epi)
        if any(r.buffer.same_as(m) for r in stmt.reads for m in made):
            movable.append(epi)
            made.extend(w.buffer for w in stmt.writes)
            continue
        try:
            sch.compute_inline(epi)
        except Exception:  # noqa: BLE001 - not inlinable: leave it and the rest where they are
            return movable
    return movable


def _reads_across(sch: Any, block: Any) -> bool:
    """Whether a 2-D block reads some buffer with its *outer* index last (a transposing read)."""
    stmt = sch.get(block)
    outer, inner = (iv.var for iv in stmt.iter_vars[-2:])
    for region in stmt.reads:
        last = _vars_in(region.region[-1].min)
        if outer in last and inner not in last:
            return True
    return False


def _parallel_spatial_block(sch: Any, block: Any) -> bool:
    loops = sch.get_loops(block)
    if not loops:
        return False
    inner = _static(sch.get(loops[-1]).extent)
    rows = _static(sch.get(loops[0]).extent) if len(loops) == 2 else None
    if inner is not None and inner % SIMD == 0 and rows is not None and rows % TRANSPOSE_ROWS == 0 and _reads_across(sch, block):
        r0, r1 = sch.split(loops[0], factors=[None, TRANSPOSE_ROWS])
        c0, c1 = sch.split(loops[1], factors=[None, SIMD])
        sch.reorder(r0, c0, r1, c1)
        sch.vectorize(c1)
        sch.parallel(r0)
        return True
    if len(loops) > 1 and inner is not None and inner % SIMD == 0:
        # rows in parallel, each row's inner loop SIMD-wide: a dequantize row reuses each loaded word
        # (and its scale) for SIMD outputs instead of recomputing its address per element
        rows = _fused(sch, loops[:-1])
        outer, _ = sch.split(rows, factors=[None, max(1, SPATIAL_CHUNK // inner)])
        _, lanes = sch.split(loops[-1], factors=[None, SIMD])
        sch.vectorize(lanes)
        sch.parallel(outer)
        return True
    fused = _fused(sch, loops)
    outer, _ = sch.split(fused, factors=[None, SPATIAL_CHUNK])
    sch.parallel(outer)
    return True


class _MatmulRule(ScheduleRule):
    """Shared front of :class:`GEMV` and :class:`Matmul`: recognise the kernel, then schedule it."""

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:  # noqa: ARG002 - dlight's signature
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        parts = _matmul_parts(sch)
        if parts is None or not self.accepts(parts):
            return None
        try:
            return self.schedule(sch, parts)
        except Exception:  # noqa: BLE001 - a primitive refused this loop nest: fall through to the next rule
            return None

    def accepts(self, parts: _MatmulParts) -> bool:
        raise NotImplementedError

    def schedule(self, sch: Any, parts: _MatmulParts) -> Any:
        raise NotImplementedError


class GEMV(_MatmulRule):
    """One output row per dot product; see the module docstring."""

    def accepts(self, parts: _MatmulParts) -> bool:
        if parts.rows != 1:
            return False
        if parts.inner:
            return parts.k % GEMV_LANES == 0
        return _outer_width(parts.n) is not None and parts.k % LANES == 0

    def schedule(self, sch: Any, parts: _MatmulParts) -> Any:
        if parts.inner:
            return self._inner(sch, parts)
        if parts.k % (SPLIT_ROWS * LANES) == 0 and parts.n % SIMD == 0:
            return self._split_k(sch, parts)
        return self._outer(sch, parts)

    @staticmethod
    def _inner(sch: Any, parts: _MatmulParts) -> Any:
        *spatial, k = sch.get_loops(parts.block)
        n = _fused(sch, spatial)
        sch.split(n, factors=[None, ROWS_PER_TASK])
        _, k1 = sch.split(k, factors=[None, GEMV_LANES])
        rf = sch.rfactor(k1, factor_axis=len(sch.get(parts.block).writes[0].buffer.shape))
        n0, n1, k0, k1 = sch.get_loops(rf)  # the partial sums' own loop nest
        sch.reverse_compute_at(parts.block, n1, preserve_unit_loops=True)
        _attach_epilogues(sch, parts.epilogues, n1)
        sch.parallel(n0)
        sch.decompose_reduction(rf, k0)
        sch.unroll(k1)
        sch.set_scope(rf, 0, SCRATCH)
        return sch

    @staticmethod
    def _outer(sch: Any, parts: _MatmulParts) -> Any:
        *spatial, k = sch.get_loops(parts.block)
        n = _fused(sch, spatial)
        n0, n1 = sch.split(n, factors=[None, _outer_width(parts.n)])
        k0, k1 = sch.split(k, factors=[None, LANES])  # LANES consecutive k share a packed word
        sch.reorder(n0, k0, k1, n1)
        acc = sch.cache_write(parts.block, 0, SCRATCH)  # running sums in a small buffer of the task, not the output
        sch.reverse_compute_at(acc, n0, preserve_unit_loops=True)
        _attach_epilogues(sch, parts.epilogues, n0)
        sch.parallel(n0)
        sch.decompose_reduction(parts.block, k0)
        sch.unroll(k1)
        # n1 stays a loop: LLVM vectorises it; unrolling it too doubled compile time for ~10 %
        return sch

    @staticmethod
    def _split_k(sch: Any, parts: _MatmulParts) -> Any:
        """``[K, N]`` weight: partial sums per block of K rows (parallel), then one pass adding them.

        Why: swept by output blocks, a task reads a short piece of every one of the K/8 word rows
        (strides of 4·N bytes), which defeats the prefetcher; here a task streams ``SPLIT_ROWS``
        whole rows. The word and scale are loaded once per ``SIMD`` outputs and ``LANES`` rows of K.
        """
        *spatial, k = sch.get_loops(parts.block)
        _fused(sch, spatial)
        kt, _ = sch.split(k, factors=[None, SPLIT_ROWS * LANES])
        rf = sch.rfactor(kt, factor_axis=0)  # partials [K / (SPLIT_ROWS·LANES), ..., N]: contiguous in N
        n, kt, kr = sch.get_loops(rf)
        width = parts.n if parts.n <= WHOLE_ROW_MAX else _outer_width(parts.n) or SIMD
        n0, n1 = sch.split(n, factors=[None, width])
        n10, n11 = sch.split(n1, factors=[None, SIMD])
        kr0, kr1 = sch.split(kr, factors=[None, LANES])  # LANES consecutive k share a packed word
        sch.reorder(kt, n0, kr0, n10, kr1, n11)
        sch.parallel(kt)
        sch.vectorize(n11)  # before decompose_reduction: afterwards the loop no longer holds a whole reduction block
        sch.decompose_reduction(rf, kr0)
        sch.unroll(kr1)
        *out, r = sch.get_loops(parts.block)
        o0, o1 = sch.split(_fused(sch, out), factors=[None, _outer_width(parts.n) or SIMD])
        sch.reorder(o0, r, o1)
        _attach_epilogues(sch, parts.epilogues, o0)
        sch.parallel(o0)
        return sch


class GroupedGEMV(ScheduleRule):
    """The regrouped one-token matmul of :func:`neox_mlc.gpt_neox_model._grouped_nt_matmul`, ``[K, N]`` weights.

    Its blocks, in order: ``NT_matmul_group`` (per group and output, ``Σ x·code`` over the group),
    ``x_group_sum``, ``NT_matmul`` (``Σ_g scale · (group sum - max_int · x sum)``), then injective
    epilogues. Split over K as :meth:`GEMV._split_k`: each parallel task owns ``GROUPS_PER_TASK``
    groups (a few whole word rows, streamed) and sweeps them across N; a group's sums for ``SIMD``
    outputs live in registers (``NT_matmul_group`` is computed at that loop), so each weight costs a
    shift, a mask, a convert and one multiply-add, and each group one scale multiply-add per output.
    A second pass adds the tasks' partial rows and runs the epilogues.
    """

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:  # noqa: ARG002 - dlight's signature
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        try:
            blocks = {name: sch.get_sblock(name) for name in ("NT_matmul_group", "x_group_sum", "NT_matmul")}
        except Exception:  # noqa: BLE001 - not this kernel
            return None
        infos = normalize_prim_func(sch)
        if not infos or len(infos) < 3 or not all(x.is_injective() for x in infos[3:]):
            return None
        try:
            return self._schedule(sch, blocks, [x.block_rv for x in infos[3:]], simd_lanes(target))
        except Exception:  # noqa: BLE001 - a primitive refused this loop nest: fall through to the next rule
            return None

    @staticmethod
    def _schedule(sch: Any, blocks: dict[str, Any], epilogues: list[Any], lanes: int) -> Any:
        part, final = blocks["NT_matmul_group"], blocks["NT_matmul"]
        *spatial, rg = sch.get_loops(final)
        n_loop = _fused(sch, spatial)
        n, groups = _static(sch.get(n_loop).extent), _static(sch.get(rg).extent)
        if n is None or groups is None:
            return None
        widest = GROUP_REGISTERS.get(lanes, 1) * lanes
        vec = next(w for w in (widest, widest // 2, lanes, 4, 2, 1) if n % w == 0)  # any N: narrower, still correct
        want = max(GROUPS_PER_TASK, groups // GROUPED_TASKS)
        per_task = next(t for t in range(want, 0, -1) if groups % t == 0)
        gt, _ = sch.split(rg, factors=[None, per_task])
        rf = sch.rfactor(gt, factor_axis=0)  # partials [groups / GROUPS_PER_TASK, ..., N]: contiguous in N
        nn, gt, gi = sch.get_loops(rf)
        width = n if n <= WHOLE_ROW_MAX else _outer_width(n, STREAM_WIDTHS) or vec
        n0, n1 = sch.split(nn, factors=[None, width])
        n10, n11 = sch.split(n1, factors=[None, vec])
        sch.reorder(gt, n0, gi, n10, n11)
        sch.parallel(gt)
        sch.compute_at(part, n10, preserve_unit_loops=True)
        *_, pj, pr = sch.get_loops(part)
        sch.reorder(pr, pj)
        sch.vectorize(pj)
        sch.set_scope(part, 0, SCRATCH)
        sch.decompose_reduction(part, pr)
        sch.unroll(pr)
        sch.vectorize(n11)
        sch.decompose_reduction(rf, gi)
        *out, r = sch.get_loops(final)
        o0, o1 = sch.split(_fused(sch, out), factors=[None, _outer_width(n) or vec])
        sch.reorder(o0, r, o1)
        _attach_epilogues(sch, epilogues, o0)
        sch.parallel(o0)
        return sch


class WordLanesGEMV(ScheduleRule):
    """The one-token matmul of :func:`neox_mlc.gpt_neox_model.word_lanes_nt_matmul_te`: weights stored ``[N, K/epw]``.

    Its blocks: ``x_deinterleave`` and ``x_word_offset`` (``x`` rearranged once per call, before the
    parallel loop), ``NT_matmul_word`` (per row and word, ``offset + Σ_e xp·code``), ``NT_matmul``
    (``Σ_w scale · word sum``), then injective epilogues. Rows run in parallel, ``ROWS_PER_TASK``
    per task, each row streamed whole. SIMD runs along K: ``NT_matmul_word`` is computed for ``lanes``
    consecutive words of a row at once (one vector load; per word position a mask, a convert and a
    multiply-add) and ``NT_matmul`` keeps one partial sum per lane (rfactor) until the row's end,
    where the lanes are added. The epilogues run after the task's rows, SIMD over them.
    A kernel the SIMD schedule cannot take gets :meth:`_plain` (rows in parallel, scalar): correct,
    never left unscheduled.
    """

    NAMES = ("x_deinterleave", "x_word_offset", "NT_matmul_word", "NT_matmul")
    ROWS_PER_TASK = 16  # output rows per parallel task (8: 10-30 % slower; 64: the same within 3 % for K 768)
    SCALES_GATHERED_MAX = 8  # the widest vector of words whose scales are read straight from q_scale
    # Longer rows are swept in chunks of this many words by all of a task's rows in turn (16 streams of
    # 384 bytes, the chunk's xp 3 KiB), not row after row. One thread, weights out of cache, kernel ms:
    # K 12288 N 3072 3.3 → 1.8, K 3072 N 12288 2.6 → 1.9, K 3072 N 768 0.14 → 0.12 (chunks of 48: 1.9, 2.0, 0.13).
    CHUNK_WORDS = 96
    # A row's lane sums are added in this many independent chains, not one chain of ``lanes`` adds: a
    # 768-long row is short enough that the chain's latency showed (output head 2.05 → 1.89 ms; 8: the same).
    HSUM_CHAINS = 4

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:  # noqa: ARG002 - dlight's signature
        if not isinstance(func, tirx.PrimFunc):
            return None
        try:
            for name in self.NAMES:
                s_tir.Schedule(func).get_sblock(name)
        except Exception:  # noqa: BLE001 - not this kernel
            return None
        lanes = simd_lanes(target)
        for schedule in (self._simd, self._plain):
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos or len(infos) < len(self.NAMES) or not all(x.is_injective() for x in infos[len(self.NAMES) :]):
                return None
            blocks = {name: sch.get_sblock(name) for name in self.NAMES}
            try:
                if schedule(sch, blocks, [x.block_rv for x in infos[len(self.NAMES) :]], lanes) is not None:
                    return sch
            except Exception:  # noqa: BLE001 - a primitive refused this loop nest: the next, simpler schedule
                continue
        return None

    @staticmethod
    def _rows(sch: Any, final: Any) -> tuple[Any, Any, int, int] | None:
        """``NT_matmul``'s fused row loop, its word loop, and their static extents."""
        *spatial, rw = sch.get_loops(final)
        j = _fused(sch, spatial)
        n, words = _static(sch.get(j).extent), _static(sch.get(rw).extent)
        return None if n is None or words is None else (j, rw, n, words)

    @classmethod
    def _simd(cls, sch: Any, blocks: dict[str, Any], epilogues: list[Any], lanes: int) -> Any:
        part, final = blocks["NT_matmul_word"], blocks["NT_matmul"]
        found = cls._rows(sch, final)
        if found is None:
            return None
        _, rw, n, words = found
        vec = next(w for w in (lanes, 8, 4, 2, 1) if words % w == 0)  # any K: narrower, still correct
        per_task = next(r for r in (cls.ROWS_PER_TASK, 1) if n % r == 0)
        _, wl = sch.split(rw, factors=[None, vec])
        rf = sch.rfactor(wl, factor_axis=len(sch.get(final).writes[0].buffer.shape))  # partials [..., N, vec]
        chains = cls.HSUM_CHAINS if vec % cls.HSUM_CHAINS == 0 and vec > cls.HSUM_CHAINS else 1
        if chains > 1:
            _, lane = sch.get_loops(final)
            _, li = sch.split(lane, factors=[None, chains])
            hsum = sch.rfactor(li, factor_axis=len(sch.get(final).writes[0].buffer.shape))
        j, wo, wl = sch.get_loops(rf)
        jt, jo = sch.split(j, factors=[None, per_task])
        steps = words // vec
        chunk = max(d for d in range(1, steps + 1) if steps % d == 0 and d * vec <= cls.CHUNK_WORDS)
        if chunk < steps:  # long rows: the task's rows sweep one chunk of K after another
            wk, wo = sch.split(wo, factors=[None, chunk])
            sch.reorder(wk, jo)
        sch.parallel(jt)
        sch.compute_at(part, wo, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(part)[-1])
        sch.set_scope(part, 0, SCRATCH)
        sch.vectorize(wl)
        if vec > cls.SCALES_GATHERED_MAX:
            # The lanes' group scales, e.g. 4 float16 repeated 4 times each: copied to a small buffer of the task
            # first, LLVM makes that one 8-byte load and a shuffle; read straight from q_scale, a gather of
            # 16 loads (162.5 M output head 3.3 → 2.1 ms). With 8 lanes it finds the shuffle by itself.
            words = sch.get(part).writes[0].buffer  # rf reads the unpacked words and the scales
            scales = next(i for i, r in enumerate(sch.get(rf).reads) if not r.buffer.same_as(words))
            cache = sch.cache_read(rf, scales, SCRATCH)
            sch.compute_at(cache, wo, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(cache)[-1])
        sch.set_scope(rf, 0, SCRATCH)
        sch.decompose_reduction(rf, wk if chunk < steps else wo)
        if chains > 1:
            sch.reverse_compute_at(hsum, jt if chunk < steps else jo)
            *_, hi, hr = sch.get_loops(hsum)
            sch.reorder(hr, hi)
            sch.unroll(hr)
            sch.unroll(hi)
            sch.set_scope(hsum, 0, SCRATCH)
        sch.reverse_compute_at(final, jt if chunk < steps else jo)
        for epi in _movable_epilogues(sch, epilogues, jt):
            try:
                sch.reverse_compute_at(epi, jt, preserve_unit_loops=True)
            except Exception:  # noqa: BLE001 - an epilogue that cannot move stays a separate loop, correct
                break
            if per_task > 1:  # SIMD over the task's rows (GELU's erf is TVM's polynomial on the host)
                sch.vectorize(_fused(sch, sch.get_loops(epi)[1:]))
        return sch

    @classmethod
    def _plain(cls, sch: Any, blocks: dict[str, Any], epilogues: list[Any], lanes: int) -> Any:  # noqa: ARG003
        """Rows in parallel, each a scalar loop over its words: the fallback, far from fast but never unscheduled."""
        part, final = blocks["NT_matmul_word"], blocks["NT_matmul"]
        sch.compute_inline(part)
        found = cls._rows(sch, final)
        if found is None:
            return None
        j, _, n, _ = found
        jt, _ = sch.split(j, factors=[None, next(r for r in (cls.ROWS_PER_TASK, 1) if n % r == 0)])
        sch.parallel(jt)
        _attach_epilogues(sch, epilogues, jt)
        return sch


class Matmul(_MatmulRule):
    """Register-tiled matmul for several tokens (prefill); see the module docstring.

    A parallel task owns ``NR`` weight rows and runs every token against them (the rows stay in
    cache while the tokens pass: the weight is read from memory once per call), each token as
    ``NR × LANES`` partial sums in registers. One token per tile (no token tiling) keeps the loops
    free of a ``seq_len`` tail predicate, which made LLVM keep the sums in memory. Past
    ``K_BLOCK`` the reduction is blocked, so the task's rows of one block fit the L1 cache.
    162.5 M q4f16_0, 128-token prefill, one thread: 1091 → 586 CPU ms (4 tokens × 4 rows, no K blocks,
    tokens outer → this).
    """

    def accepts(self, parts: _MatmulParts) -> bool:
        return parts.rows != 1 and parts.inner and parts.k % LANES == 0 and parts.n % NR == 0

    def schedule(self, sch: Any, parts: _MatmulParts) -> Any:
        *spatial, n, k = sch.get_loops(parts.block)
        m = _fused(sch, spatial)
        n0, n1 = sch.split(n, factors=[None, NR])
        k0, k1 = sch.split(k, factors=[None, LANES])
        sch.reorder(n0, m, n1, k0, k1)
        rf = sch.rfactor(k1, factor_axis=len(sch.get(parts.block).writes[0].buffer.shape))
        n0, m, n1, k0, k1 = sch.get_loops(rf)
        sch.reorder(k0, n1, k1)
        if parts.k > K_BLOCK and parts.k % K_BLOCK == 0:
            kb, k0 = sch.split(k0, factors=[None, K_BLOCK // LANES])
            sch.reorder(kb, m)  # the sums of every token persist across the blocks (a small per-task buffer)
            sch.reverse_compute_at(parts.block, n0, preserve_unit_loops=True)
            _attach_epilogues(sch, parts.epilogues, n0)
            sch.parallel(n0)
            sch.decompose_reduction(rf, kb)
        else:
            sch.reverse_compute_at(parts.block, m, preserve_unit_loops=True)
            _attach_epilogues(sch, parts.epilogues, m)
            sch.parallel(sch.fuse(n0, m))  # (a fused loop: dataflow under a parallel n0 alone is not compact)
            sch.decompose_reduction(rf, k0)
        for loop in (n1, k1):
            sch.unroll(loop)
        sch.set_scope(rf, 0, SCRATCH)
        return sch


class ParallelSpatial(ScheduleRule):
    """Elementwise kernels: every block's loops fused and run in parallel chunks."""

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:  # noqa: ARG002 - dlight's signature
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(info.is_injective() for info in infos):
            return None
        try:
            done = [_parallel_spatial_block(sch, info.block_rv) for info in infos]
        except Exception:  # noqa: BLE001 - leave the kernel to the next rule
            return None
        return sch if any(done) else None


class ParallelReductions(ScheduleRule):
    """dlight rule: inline injective producers, then parallelise each reduction's spatial loops."""

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:  # noqa: ARG002 - dlight's signature
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        for info in infos:
            if not info.is_reduction() and len(infos) > 1:
                try:
                    sch.compute_inline(info.block_rv)
                except Exception:  # noqa: BLE001 - not every producer can be inlined; leave it
                    continue
        scheduled = False
        for info in infos:
            if not info.is_reduction():
                continue
            loops = sch.get_loops(info.block_rv)
            kinds = info.dom_kind()
            spatial = [lp for lp, k in zip(loops, kinds, strict=False) if k == "S"]
            reduction = [lp for lp, k in zip(loops, kinds, strict=False) if k == "R"]
            if not spatial or not reduction:
                continue
            try:
                sch.reorder(*spatial, *reduction)
                fused = _fused(sch, spatial)
                outer, _ = sch.split(fused, factors=[None, CHUNK])
                sch.parallel(outer)
                scheduled = True
            except Exception:  # noqa: BLE001 - an unusual loop nest stays unscheduled, still correct
                continue
            if len(reduction) == 1:
                self._split_accumulators(sch, reduction[0], len(spatial))
        return sch if scheduled else None

    @staticmethod
    def _split_accumulators(sch: Any, loop: Any, spatial_dims: int) -> None:
        """rfactor the reduction into LANES partial sums: independent accumulators the CPU overlaps."""
        try:
            _, inner = sch.split(loop, factors=[None, LANES])
            sch.rfactor(inner, factor_axis=spatial_dims)
        except Exception:  # noqa: BLE001 - keep the plain parallel schedule for this kernel
            return


def host_rules() -> list[ScheduleRule]:
    """The rules in the order dlight tries them."""
    return [GroupedGEMV(), WordLanesGEMV(), GEMV(), Matmul(), ParallelSpatial(), ParallelReductions()]
