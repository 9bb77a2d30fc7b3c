"""The host GEMV schedule for weights stored ``[K, N]`` (the ``_0`` layouts), on one kernel of its own.

Why a kernel of its own: the tiny model's layers are too small to show how a schedule walks memory,
and the whole-library tests (test_compile, test_conformance) do not say which rule scheduled what.
"""

from __future__ import annotations

import numpy as np
import pytest


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


def _scheduled(k: int, n: int):
    import tvm
    from tvm.s_tir import dlight as dl

    from neox_mlc.compile import make_target
    from neox_mlc.cpu_schedule import host_rules

    target = make_target("llvm")
    with target:
        mod = dl.ApplyDefaultSchedule(*host_rules())(_q4_0_gemv(k, n))
    return mod, tvm.compile(mod, target=target)


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


def _vars(expr) -> set:
    from tvm import tirx

    out: set = set()
    tirx.stmt_functor.post_order_visit(expr, lambda e: out.add(e) if isinstance(e, tirx.Var) else None)
    return out
