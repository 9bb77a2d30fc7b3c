"""The host GEMV schedule for weights stored ``[K, N]`` (the ``_0`` layouts), on one kernel of its own.

Why a kernel of its own: the tiny model's layers are too small to show how a schedule walks memory,
and the whole-library tests (test_compile, test_conformance) do not say which rule scheduled what.
"""

from __future__ import annotations

import numpy as np
import pytest
from cpu_flags import host_flags


def _q4_0_gemv(k: int, n: int):
    """``y = x · W`` with ``W`` unpacked from q4f16_0's ``[K/8, N]`` words and ``[K/32, N]`` scales, as the model computes it."""
    import tvm
    from tvm import te

    from neox_mlc.gpt_neox_model import _weight_element
    from neox_mlc.quantization import get_quantization

    quant = get_quantization("q4f16_0")
    qw = te.placeholder((k // 8, n), "uint32", name="qw")
    qs = te.placeholder((k // 32, n), "float16", name="qs")
    x = te.placeholder((1, 1, k), "float16", name="x")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute(
        (1, 1, n),
        lambda b, s, j: te.sum(x[b, s, r].astype("float32") * _weight_element(quant, qw, qs, j, r, True), axis=r),
        name="NT_matmul",
    )
    out = te.compute((1, 1, n), lambda b, s, j: y[b, s, j].astype("float16"), name="cast")
    return tvm.IRModule({"main": te.create_prim_func([x, qw, qs, out])})


def _host_built(func, cpu: str | None = None):
    """``func`` scheduled by the host rules for ``cpu`` (None: this machine's default) and built: (module, executable)."""
    import tvm
    from tvm.s_tir import dlight as dl

    from neox_mlc.compile import make_target
    from neox_mlc.cpu_schedule import host_rules

    target = make_target("llvm", cpu)
    with target:
        mod = dl.ApplyDefaultSchedule(*host_rules())(tvm.IRModule({"main": func}))
    return mod, tvm.compile(mod, target=target)


def _allocated(mod) -> list:
    """The buffers the blocks of ``mod["main"]`` allocate."""
    from tvm import tirx

    bufs: list = []
    tirx.stmt_functor.post_order_visit(mod["main"].body, lambda st: bufs.extend(st.alloc_buffers) if isinstance(st, tirx.SBlock) else None)
    return bufs


def _scheduled(k: int, n: int):
    return _host_built(_q4_0_gemv(k, n)["main"])


def _parallel_loops_reading(func, buffer_name: str) -> list:
    """(loop variable, row indices of ``buffer_name`` in loop variables) for each parallel loop that reads it."""
    from tvm import tirx

    found = []

    def visit(stmt):
        if isinstance(stmt, tirx.For) and stmt.kind == tirx.ForKind.PARALLEL:
            rows = []

            def realize(s):
                if isinstance(s, tirx.SBlockRealize):
                    binding = {iv.var: value for iv, value in zip(s.block.iter_vars, s.iter_values, strict=True)}
                    rows.extend(
                        tirx.stmt_functor.substitute(r.region[0].min, binding)
                        for r in s.block.reads
                        if r.buffer.name == buffer_name
                    )

            tirx.stmt_functor.post_order_visit(stmt.body, realize)
            if rows:
                found.append((stmt.loop_var, rows))

    tirx.stmt_functor.post_order_visit(func.body, visit)
    return found


@pytest.mark.parametrize("k,n", [(256, 512), (96, 264)])  # split over K; K not a multiple of 64 (fallback)
def test_q4_0_gemv_matches_numpy(k, n):
    import tvm

    _, lib = _scheduled(k, n)
    rng = np.random.default_rng(0)
    qw = rng.integers(0, 2**32, size=(k // 8, n), dtype=np.uint32)
    qs = (rng.random((k // 32, n)) * 0.01).astype("float16")
    x = rng.standard_normal((1, 1, k)).astype("float16")
    dev = tvm.cpu()
    out = tvm.runtime.empty((1, 1, n), "float16", dev)
    lib["main"](*(tvm.runtime.tensor(a, dev) for a in (x, qw, qs)), out)
    codes = ((qw[:, None, :] >> (np.arange(8, dtype=np.uint32) * 4)[None, :, None]) & 15).reshape(k, n).astype(np.float32)
    ref = x.astype(np.float32).reshape(-1) @ ((codes - 7) * np.repeat(qs.astype(np.float32), 32, axis=0))
    assert np.abs(out.numpy().reshape(-1).astype(np.float32) - ref).max() <= 2e-3 * np.abs(ref).max()


def test_q4_0_gemv_tasks_stream_whole_rows_of_words():
    """Each parallel task reads its own block of packed-word rows (K), across all of N, with SIMD over N.

    Swept by output blocks instead, each task read a 1 KiB piece of every one of the K/8 rows: the
    162 M model's output head took 6.5 ms a step instead of 4.2 (docs/benchmarks/runtime-decode-profile-gemv.json).
    """
    from tvm import tirx

    mod, _ = _scheduled(256, 512)
    found = _parallel_loops_reading(mod["main"], "qw")
    assert found, "no parallel loop reads the packed weight"
    for var, rows in found:
        assert all(var in _vars(row) for row in rows), "the parallel loop does not pick the weight's rows (K)"
    kinds = []
    tirx.stmt_functor.post_order_visit(mod["main"].body, lambda s: kinds.append(s.kind) if isinstance(s, tirx.For) else None)
    assert tirx.ForKind.VECTORIZED in kinds


def test_grouped_gemv_reads_wide_rows_in_page_sized_pieces():
    """Past ``WHOLE_ROW_MAX`` outputs a task sweeps each word row in pieces of at least 1024 words (4 KiB).

    In 256-word pieces (1 KiB, then a jump of 4·N bytes to the next word row) the prefetcher never got
    going: 3.6 B shape q4f16_0 decode, one thread, 330 CPU ms a step against 167 (MLP up, N 12288: 114 → 46).
    """
    from tvm import tirx

    from neox_mlc.quantization import get_quantization

    n = 8192
    mod, _ = _grouped(get_quantization("q4f16_0"), 128, n, "x86-64-v3")
    tasks = []
    tirx.stmt_functor.post_order_visit(mod["main"].body, lambda s: tasks.append(s) if isinstance(s, tirx.For) and s.kind == tirx.ForKind.PARALLEL else None)
    sweep = next(t for t in tasks if "NT_matmul_group" in str(t))  # the partial sums' task loop
    assert isinstance(sweep.body, tirx.For), "a task's first loop should sweep N in pieces"
    assert n // int(sweep.body.extent) >= 1024, f"word rows read {n // int(sweep.body.extent)} words at a time"


def test_transposing_dequantize_reads_each_word_row_for_16_outputs():
    """q4f16_0's prefill dequantize (words ``[K/8, N]`` in, ``[N, K]`` out) takes 16 output rows per word row.

    Row by row it read one word of each cache line per output (3.6 B shape, 64-token prefill, one
    thread: dequantize 1.51 CPU s against 0.80). Values equal numpy's exactly (float16 of an exact product).
    """
    import tvm
    from tvm import te, tirx
    from tvm.s_tir import dlight as dl

    from neox_mlc.compile import make_target
    from neox_mlc.cpu_schedule import TRANSPOSE_ROWS, host_rules
    from neox_mlc.gpt_neox_model import _weight_element
    from neox_mlc.quantization import get_quantization

    quant, k, n = get_quantization("q4f16_0"), 256, 64
    qw = te.placeholder((k // 8, n), "uint32", name="qw")
    qs = te.placeholder((k // 32, n), "float16", name="qs")
    w = te.compute((n, k), lambda i, j: _weight_element(quant, qw, qs, i, j, True).astype("float16"), name="dequantize")
    target = make_target("llvm", "x86-64-v3")
    with target:
        mod = dl.ApplyDefaultSchedule(*host_rules())(tvm.IRModule({"main": te.create_prim_func([qw, qs, w])}))
    loops = []
    tirx.stmt_functor.post_order_visit(mod["main"].body, lambda s: loops.append(s) if isinstance(s, tirx.For) else None)
    serial = [int(x.extent) for x in loops if x.kind == tirx.ForKind.SERIAL]
    assert serial[:2] == [TRANSPOSE_ROWS, k // 8], f"loops {serial}: rows should sit inside the word-row loop"
    rng = np.random.default_rng(3)
    words = rng.integers(0, 2**32, size=(k // 8, n), dtype=np.uint64).astype(np.uint32)
    scales = (rng.random((k // 32, n)) * 0.1 + 0.01).astype(np.float16)
    out = tvm.runtime.tensor(np.zeros((n, k), np.float16))
    tvm.compile(mod, target=target)(tvm.runtime.tensor(words), tvm.runtime.tensor(scales), out)
    codes = (words[:, None, :] >> (4 * np.arange(8, dtype=np.uint32))[None, :, None]) & 15  # [K/8, 8, N]
    ref = ((codes.reshape(k, n).astype(np.float32) - 7) * np.repeat(scales.astype(np.float32), 32, axis=0)).astype(np.float16).T
    assert np.array_equal(out.numpy(), ref)


def _vars(expr) -> set:
    from tvm import tirx

    out: set = set()
    tirx.stmt_functor.post_order_visit(expr, lambda e: out.add(e) if isinstance(e, tirx.Var) else None)
    return out


def _grouped(quant, k: int, n: int, cpu: str):
    """The regrouped one-token kernel (gpt_neox_model.grouped_nt_matmul_te) with a cast epilogue, scheduled and built."""
    from tvm import te

    from neox_mlc.gpt_neox_model import grouped_nt_matmul_te

    qw = te.placeholder((k // quant.elems_per_word, n), "uint32", name="qw")
    qs = te.placeholder((k // quant.group_size, n), "float16", name="qs")
    x = te.placeholder((1, 1, k), "float16", name="x")
    y = grouped_nt_matmul_te(x, qw, qs, quant, n, k, True)
    out = te.compute((1, 1, n), lambda b, s, j: y[b, s, j].astype("float16"), name="cast")
    return _host_built(te.create_prim_func([x, qw, qs, out]), cpu)


def _has_avx512() -> bool:
    return "avx512f" in host_flags()


@pytest.mark.parametrize(
    "bits,group,k,n,cpu",
    [
        (4, 32, 256, 512, "x86-64-v3"),  # the top nibble reaches bit 31: read one bit lower
        (4, 32, 96, 264, "x86-64-v3"),  # 3 groups (one per task), N not a multiple of 16
        (3, 40, 160, 96, "x86-64-v3"),  # 10 codes in 30 bits: no top-bit element
        pytest.param(4, 32, 256, 512, "x86-64-v4", marks=pytest.mark.skipif(not _has_avx512(), reason="no AVX-512 here")),
    ],
)
def test_grouped_gemv_matches_numpy(bits, group, k, n, cpu):
    """Regrouped ``Σ_g s_g (Σ x·c - max_int Σ x)`` equals ``x · ((c - max_int) · s)``, codes in every value (top ones included)."""
    import tvm
    from tvm import tirx

    from neox_mlc.quantization import Quantization

    quant = Quantization(f"q{bits}f16_0", "group-quant", "float16", bits=bits, group_size=group, transposed=True)
    mod, lib = _grouped(quant, k, n, cpu)
    kinds = []
    tirx.stmt_functor.post_order_visit(mod["main"].body, lambda s: kinds.append(s.kind) if isinstance(s, tirx.For) else None)
    assert tirx.ForKind.PARALLEL in kinds and tirx.ForKind.VECTORIZED in kinds, "GroupedGEMV did not schedule the kernel"
    epw = quant.elems_per_word
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 2 * quant.max_int + 1, size=(k // epw, epw, n), dtype=np.uint32)
    codes[0, -1, :] = 2 * quant.max_int  # the word's top element at its largest code
    qw = np.bitwise_or.reduce(codes << (np.arange(epw, dtype=np.uint32) * bits)[None, :, None], axis=1).astype(np.uint32)
    qs = (rng.random((k // group, n)) * 0.01).astype("float16")
    x = rng.standard_normal((1, 1, k)).astype("float16")
    dev = tvm.cpu()
    out = tvm.runtime.empty((1, 1, n), "float16", dev)
    lib["main"](*(tvm.runtime.tensor(a, dev) for a in (x, qw, qs)), out)
    w = (codes.reshape(k, n).astype(np.float32) - quant.max_int) * np.repeat(qs.astype(np.float32), group, axis=0)
    ref = x.astype(np.float32).reshape(-1) @ w
    assert np.abs(out.numpy().reshape(-1).astype(np.float32) - ref).max() <= 2e-3 * np.abs(ref).max()


@pytest.mark.parametrize("k,n,seq", [(256, 64, 5), (1536, 48, 3)])  # K ≤ K_BLOCK; K blocked (1536 = 2 blocks)
def test_prefill_matmul_is_tiled_and_matches_numpy(k, n, seq):
    """The Matmul rule (not a fallback) schedules a several-token matmul of any ``seq_len``, exactly."""
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    from neox_mlc.compile import make_target
    from neox_mlc.cpu_schedule import Matmul, host_rules

    s = te.var("seq_len", "int64")
    x = te.placeholder((1, s, k), "float16", name="x")
    w = te.placeholder((n, k), "float32", name="w")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((1, s, n), lambda b, i, j: te.sum(x[b, i, r].astype("float32") * w[j, r], axis=r), name="NT_matmul")
    # the epilogue chain of the model's MLP (bias, GELU as legalized: one block per op, one reading two), cast
    biased = te.compute((1, s, n), lambda b, i, j: y[b, i, j] + 1.0, name="bias")
    half = te.compute((1, s, n), lambda b, i, j: tvm.tirx.erf(biased[b, i, j] * 0.7071067811865476) * 0.5 + 0.5, name="erf")
    act = te.compute((1, s, n), lambda b, i, j: biased[b, i, j] * half[b, i, j], name="gelu")
    out = te.compute((1, s, n), lambda b, i, j: act[b, i, j].astype("float16"), name="cast")
    target = make_target("llvm", "x86-64-v3")
    assert Matmul().apply(te.create_prim_func([x, w, out]), target, False) is not None, "the Matmul rule refused the kernel"
    with target:
        mod = dl.ApplyDefaultSchedule(*host_rules())(tvm.IRModule({"main": te.create_prim_func([x, w, out])}))
    assert any(b.name.endswith(".rf") for b in _allocated(mod)), "the register-tiled Matmul schedule did not apply (a fallback scheduled the kernel)"
    lib = tvm.compile(mod, target=target)
    rng = np.random.default_rng(2)
    xv = rng.standard_normal((1, seq, k)).astype("float16")
    wv = (rng.standard_normal((n, k)) * 0.05).astype("float32")
    dev = tvm.cpu()
    res = tvm.runtime.empty((1, seq, n), "float16", dev)
    lib["main"](tvm.runtime.tensor(xv, dev), tvm.runtime.tensor(wv, dev), res)
    pre = xv.astype(np.float32) @ wv.T + 1.0
    from math import erf

    ref = pre * (np.vectorize(erf)(pre * 0.7071067811865476) * 0.5 + 0.5)
    assert np.abs(res.numpy().astype(np.float32) - ref).max() <= 2e-3 * np.abs(ref).max()


def _word_lanes(quant, k: int, n: int, cpu: str, plain: bool = False):
    """The one-token kernel for ``[N, K/epw]`` weights (gpt_neox_model.word_lanes_nt_matmul_te) with a cast epilogue, built.

    ``plain``: scheduled by the rule's fallback (``WordLanesGEMV._plain``) instead of the host rules.
    """
    import tvm
    from tvm import s_tir, te
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    from neox_mlc.compile import make_target
    from neox_mlc.cpu_schedule import WordLanesGEMV
    from neox_mlc.gpt_neox_model import word_lanes_nt_matmul_te

    qw = te.placeholder((n, k // quant.elems_per_word), "uint32", name="qw")
    qs = te.placeholder((n, k // quant.group_size), quant.model_dtype, name="qs")
    x = te.placeholder((1, 1, k), quant.model_dtype, name="x")
    y = word_lanes_nt_matmul_te(x, qw, qs, quant, n, k)
    out = te.compute((1, 1, n), lambda b, s, j: y[b, s, j].astype(quant.model_dtype), name="cast")
    func = te.create_prim_func([x, qw, qs, out])
    if not plain:
        return _host_built(func, cpu)
    sch = s_tir.Schedule(func)
    epilogues = [i.block_rv for i in normalize_prim_func(sch)[len(WordLanesGEMV.NAMES) :]]
    assert WordLanesGEMV._plain(sch, {name: sch.get_sblock(name) for name in WordLanesGEMV.NAMES}, epilogues, 8) is not None
    return sch.mod, tvm.compile(sch.mod, target=make_target("llvm", cpu))


def _vectorized_loops_reading(func, buffer_name: str) -> int:
    """How many vectorized loops hold a block that reads ``buffer_name``."""
    from tvm import tirx

    found = [0]

    def visit(stmt):
        if isinstance(stmt, tirx.For) and stmt.kind == tirx.ForKind.VECTORIZED:
            reads = []
            tirx.stmt_functor.post_order_visit(
                stmt.body, lambda s: reads.extend(r.buffer.name for r in s.block.reads) if isinstance(s, tirx.SBlockRealize) else None
            )
            found[0] += buffer_name in reads

    tirx.stmt_functor.post_order_visit(func.body, visit)
    return found[0]


@pytest.mark.parametrize(
    "name,bits,group,k,n,cpu,plain",
    [
        ("q4f16_1", 4, 32, 256, 512, "x86-64-v3", False),  # the top nibble reaches bit 31: read one bit lower
        ("q4f16_1", 4, 32, 96, 264, "x86-64-v3", False),  # 12 words a row (4 lanes), N not a multiple of 16
        ("q3f16_1", 3, 40, 160, 96, "x86-64-v3", False),  # 10 codes in 30 bits: no top-bit element
        ("q4f32_1", 4, 32, 256, 48, "x86-64-v3", False),  # float32 scales and activations
        ("q4f16_1", 4, 32, 256, 512, "x86-64-v3", True),  # the fallback schedule
        ("q4f16_1", 4, 32, 1024, 48, "x86-64-v3", False),  # 128 words a row: swept in chunks of K by the task's rows
        pytest.param("q4f16_1", 4, 32, 512, 40, "x86-64-v4", False, marks=pytest.mark.skipif(not _has_avx512(), reason="no AVX-512 here")),
    ],
)
def test_word_lanes_gemv_matches_numpy(name, bits, group, k, n, cpu, plain):
    """``Σ_w s·(Σ_e xp·code·2^pos - max_int Σ_e x)`` over ``[N, K/epw]`` words equals ``W · x``, codes in every value.

    And the host rules schedule it with SIMD along K (a vectorized loop reads the packed weight) in parallel.
    """
    import tvm
    from tvm import tirx

    from neox_mlc.quantization import Quantization

    dtype = "float32" if "f32" in name else "float16"
    quant = Quantization(name, "group-quant", dtype, bits=bits, group_size=group, transposed=False)
    mod, lib = _word_lanes(quant, k, n, cpu, plain)
    if not plain:
        kinds = []
        tirx.stmt_functor.post_order_visit(mod["main"].body, lambda s: kinds.append(s.kind) if isinstance(s, tirx.For) else None)
        assert tirx.ForKind.PARALLEL in kinds and _vectorized_loops_reading(mod["main"], "qw"), "WordLanesGEMV did not schedule the kernel"
    epw = quant.elems_per_word
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 2 * quant.max_int + 1, size=(n, k // epw, epw), dtype=np.uint32)
    codes[:, 0, -1] = 2 * quant.max_int  # the word's top element at its largest code
    qw = np.bitwise_or.reduce(codes << (np.arange(epw, dtype=np.uint32) * bits), axis=2).astype(np.uint32)
    qs = (rng.random((n, k // group)) * 0.01).astype(dtype)
    x = rng.standard_normal((1, 1, k)).astype(dtype)
    dev = tvm.cpu()
    out = tvm.runtime.empty((1, 1, n), dtype, dev)
    lib["main"](*(tvm.runtime.tensor(a, dev) for a in (x, qw, qs)), out)
    w = (codes.reshape(n, k).astype(np.float32) - quant.max_int) * np.repeat(qs.astype(np.float32), group, axis=1)
    ref = w @ x.astype(np.float32).reshape(-1)
    assert np.abs(out.numpy().reshape(-1).astype(np.float32) - ref).max() <= 2e-3 * np.abs(ref).max()


def test_word_lanes_gemv_epilogue_that_adds_another_layers_output_runs_per_task():
    """``cast(W·x) + cast(other + bias)``, as FuseOps fuses a q4f16_1 decode's dense layer with an int16
    kernel's 4h→h output: the ``other + bias`` chain reads nothing the kernel makes. Moved whole under
    the parallel row loop, every task computed the sum for all N rows, reading rows other tasks had
    not written (NaN logits). Each task must handle only its rows, and the result must be exact."""
    import tvm
    from tvm import te, tirx
    from tvm.s_tir import dlight as dl

    from neox_mlc.compile import make_target
    from neox_mlc.cpu_schedule import host_rules
    from neox_mlc.gpt_neox_model import word_lanes_nt_matmul_te
    from neox_mlc.quantization import Quantization

    k, n = 256, 64
    quant = Quantization("q4f16_1", "group-quant", "float16", bits=4, group_size=32, transposed=False)
    qw = te.placeholder((n, k // 8), "uint32", name="qw")
    qs = te.placeholder((n, k // 32), "float16", name="qs")
    x = te.placeholder((1, 1, k), "float16", name="x")
    other = te.placeholder((1, 1, n), "float32", name="other")
    bias = te.placeholder((n,), "float32", name="bias")
    y = word_lanes_nt_matmul_te(x, qw, qs, quant, n, k)
    mine = te.compute((1, 1, n), lambda b, s, j: y[b, s, j].astype("float16"), name="cast")
    theirs = te.compute((1, 1, n), lambda b, s, j: other[b, s, j] + bias[j], name="other_bias")
    theirs16 = te.compute((1, 1, n), lambda b, s, j: theirs[b, s, j].astype("float16"), name="other_cast")
    out = te.compute((1, 1, n), lambda b, s, j: mine[b, s, j] + theirs16[b, s, j], name="sum")
    func = te.create_prim_func([x, qw, qs, other, bias, out])
    target = make_target("llvm", "x86-64-v3")
    with target:
        mod = dl.ApplyDefaultSchedule(*host_rules())(tvm.IRModule({"main": func}))
    parallel = []
    tirx.stmt_functor.post_order_visit(mod["main"].body, lambda s: parallel.append(s) if isinstance(s, tirx.For) and s.kind == tirx.ForKind.PARALLEL else None)
    assert len(parallel) == 1, "WordLanesGEMV did not schedule the kernel"
    extents = []
    tirx.stmt_functor.post_order_visit(parallel[0].body, lambda s: extents.append(int(s.extent)) if isinstance(s, tirx.For) else None)
    assert n not in extents, f"a task loops over all {n} rows: {extents}"
    lib = tvm.compile(mod, target=target)
    rng = np.random.default_rng(3)
    qwv = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
    qsv = (rng.random((n, k // 32)) * 0.01).astype("float16")
    xv, ov, bv = rng.standard_normal((1, 1, k)).astype("float16"), rng.standard_normal((1, 1, n)).astype("float32"), rng.standard_normal(n).astype("float32")
    res = tvm.runtime.empty((1, 1, n), "float16", tvm.cpu())
    lib["main"](*(tvm.runtime.tensor(a) for a in (xv, qwv, qsv, ov, bv)), res)
    codes = np.stack([(qwv >> np.uint32(4 * e)) & np.uint32(15) for e in range(8)], axis=2).reshape(n, k).astype(np.float32)
    ref = ((codes - 7) * np.repeat(qsv.astype(np.float32), 32, axis=1)) @ xv.reshape(-1).astype(np.float32) + (ov.reshape(-1) + bv).astype(np.float16)
    assert np.abs(res.numpy().reshape(-1).astype(np.float32) - ref).max() <= 2e-3 * np.abs(ref).max()


def _float_gemv(k: int, n: int):
    """q0f16's one-token matmul (float16 weights ``[N, K]``) with a cast epilogue, scheduled by the host rules and built."""
    from tvm import te

    x = te.placeholder((1, 1, k), "float16", name="x")
    w = te.placeholder((n, k), "float16", name="w")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((1, 1, n), lambda b, s, j: te.sum(x[b, s, r].astype("float32") * w[j, r].astype("float32"), axis=r), name="NT_matmul")
    out = te.compute((1, 1, n), lambda b, s, j: y[b, s, j].astype("float16"), name="cast")
    return _host_built(te.create_prim_func([x, w, out]))


def test_decode_gemv_tasks_keep_their_scratch_on_the_stack():
    """A "local" buffer was a TVMBackendAllocWorkspace call and a free in every task (every few output
    rows): 10-16 % of a 162.5 M decode step's CPU time. The rules that schedule the model's decode
    matmuls (AVX-512 VNNI hosts run cpu_gemv's 4-bit kernels instead, test_cpu_gemv): none in their tasks."""
    from host_calls import workspace_allocs_in_tasks

    from neox_mlc.quantization import get_quantization

    built = {
        "GEMV (q0f16)": _float_gemv(768, 256),
        "GroupedGEMV (q4f16_0)": _grouped(get_quantization("q4f16_0"), 768, 256, "x86-64-v3"),
        "WordLanesGEMV (q4f16_1)": _word_lanes(get_quantization("q4f16_1"), 768, 256, "x86-64-v3"),
    }
    for name, (_, ex) in built.items():
        tasks = workspace_allocs_in_tasks(ex)
        assert tasks, f"{name}: no parallel task body found"
        assert sum(tasks.values()) == 0, f"{name}: workspace allocations in its tasks {tasks}"


def test_word_lanes_gemv_copies_the_scales_not_the_words_for_wide_vectors():
    """16 lanes: the scales of a task's step are copied to a small buffer (one load and a shuffle, not a
    16-load gather); the rfactor block reads both the words and the scales, and only the scales qualify."""
    from neox_mlc.quantization import get_quantization

    mod, _ = _word_lanes(get_quantization("q4f16_1"), 768, 256, "x86-64-v4")
    names = [b.name for b in _allocated(mod)]
    assert "NT_matmul.rf" in names, "the SIMD schedule did not apply"
    copies = [n for n in names if n.startswith(("qs_", "NT_matmul_word_"))]
    assert len(copies) == 1 and copies[0].startswith("qs_"), names
