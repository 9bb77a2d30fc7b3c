"""The host library's integer-dot-product decode GEMV (neox_mlc/cpu_gemv.py) against numpy.

The kernels quantize ``x`` to int16 per group of 32 (scale ``max|x| / Q``, ``Q`` = 32767 for the columns
kernel, 32639 for the rows kernel's byte split), so each product may be off by at most
``|W[j, k]| · max|x|_group / 2Q``; the test holds every output to that bound (plus
float32 rounding), which a wrong lane, pair or group — or int8 activations — would break.
"""

import numpy as np
import pytest
from cpu_flags import needs_vnni

from neox_mlc import cpu_gemv
from neox_mlc.compile import make_target


def _built_for_vnni(func):
    """``func`` compiled for an AVX-512 VNNI host (whether or not this one is)."""
    import tvm

    return tvm.compile(
        tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
        target=tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"]}),
    )


def _dequantized(qw: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """``W[k, n]`` of words ``[K/8, N]`` and scales ``[K/32, N]`` (MLC's q4f16_0 layout), in float64."""
    k8, n = qw.shape
    codes = np.stack([(qw >> np.uint32(4 * e)) & np.uint32(15) for e in range(8)], axis=1).reshape(k8 * 8, n)
    return (codes.astype(np.float64) - 7) * np.repeat(qs.astype(np.float64), 32, axis=0)


CASES = [
    # layout, K, N, batch, x dtype: the columns kernel ([K/8, N], q4f16_0) and the rows kernel ([N, K/8], q4f16_1)
    ("columns", 64, 64, 1, "float16"),
    ("columns", 256, 192, 2, "float32"),
    ("columns", 3072, 768, 1, "float16"),
    ("rows", 128, 8, 1, "float16"),
    ("rows", 256, 196, 2, "float32"),
    ("rows", 3072, 768, 1, "float16"),
    ("rows", 12288, 64, 3, "float16"),  # long rows: two sets of 4 rows a task (row_sets)
    ("rows", 12288, 12, 1, "float16"),  # long rows, N not a multiple of 8: one set
]


@pytest.mark.parametrize("layout,k,n,batch,x_dtype", CASES)
def test_int16_gemv_is_within_the_int16_rounding_bound_of_the_exact_product(layout, k, n, batch, x_dtype):
    import tvm

    needs_vnni()
    rng = np.random.default_rng(k + n)
    x = (rng.standard_normal((batch, 1, k)) * np.where(rng.random(k) < 0.05, 30.0, 1.0)).astype(x_dtype)  # a few outliers
    qw = rng.integers(0, 2**32, (k // 8, n), dtype=np.uint32)  # every code 0..15
    qs = (rng.random((k // 32, n)) * 0.02).astype(np.float16)
    w = _dequantized(qw, qs)
    if layout == "columns":
        func, q_max, args = cpu_gemv.grouped_gemv_columns(k, n, 7, x_dtype, "float16"), cpu_gemv.Q_MAX, (x, qw, qs)
    else:  # the same weight stored as MLC's _1 layout stores it
        func, q_max, args = cpu_gemv.grouped_gemv_rows(k, n, 7, x_dtype, "float16"), cpu_gemv.SPLIT_MAX, (x, np.ascontiguousarray(qw.T), np.ascontiguousarray(qs.T))
    ex = _built_for_vnni(func)
    out = tvm.runtime.tensor(np.zeros((batch, 1, n), np.float32))
    ex(*[tvm.runtime.tensor(a) for a in args], out)
    xs = x.reshape(batch, k).astype(np.float64)
    exact = xs @ w
    group_max = np.repeat(np.abs(xs).reshape(batch, k // 32, 32).max(axis=2), 32, axis=1)
    bound = (group_max / (2 * q_max)) @ np.abs(w) + 1e-5 * (np.abs(xs) @ np.abs(w))
    err = np.abs(out.numpy().reshape(batch, n) - exact)
    assert (err <= bound).all(), f"max excess {(err - bound).max()}"
    assert err.max() > 0  # int16 activations, not a float path


def test_the_rows_kernel_applies_to_the_line_models_shapes_and_not_to_partial_chunks():
    for k, n in [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072), (3072, 51200), (768, 50432)]:
        assert cpu_gemv.applies(4, 8, 32, k, n, transposed=False)
    assert not cpu_gemv.applies(4, 8, 32, 64, 256, transposed=False)  # K not whole 128-code chunks: WordLanesGEMV
    assert not cpu_gemv.applies(4, 8, 32, 256, 6, transposed=False)  # N not whole blocks of 4 rows
    assert not cpu_gemv.applies(3, 10, 40, 3072, 3072, transposed=False)  # q3


def test_plan_splits_k_so_two_threads_share_every_layer_evenly():
    """Tasks: panels of outputs × K splits; at least TASKS of them, rows read in pieces ≥ 4 KiB where N allows."""
    for k, n in [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072), (3072, 51200), (768, 2304), (768, 50432)]:
        panel, split = cpu_gemv.plan(k, n)
        assert n % panel == 0 and panel % cpu_gemv.OUT_BLOCK == 0 and panel <= cpu_gemv.PANEL_MAX
        assert (k // cpu_gemv.GROUP) % split == 0
        assert (n // panel) * split >= cpu_gemv.TASKS or split == k // cpu_gemv.GROUP
    assert cpu_gemv.plan(3072, 12288) == (4096, 6)
    assert cpu_gemv.plan(12288, 3072) == (3072, 16)


def test_host_decode_uses_the_int16_gemv_only_where_the_target_has_vnni(tmp_path, tiny_model):
    """The default host target adds +avx512vnni on a VNNI CPU, and decode then calls the kernels: q4f16_0
    (columns) for every matmul, q4f16_1 (rows) for those whose K is whole 128-code chunks (the tiny
    model's 4h→h, K 256; hidden 64 keeps WordLanesGEMV). An x86-64-v3 build (no AVX-512) calls none."""
    import json

    from host_calls import called_kernels

    from neox_mlc.gen_config import load_templates, make_chat_config

    def decode_calls(quant, host_cpu):
        cfg = tmp_path / f"{quant}-mlc-chat-config.json"
        cfg.write_text(json.dumps(make_chat_config(tiny_model, quant, "line_llm", load_templates()["line_llm"], 64)))
        return [n for n in called_kernels(cfg, "decode", host_cpu) if "NT_matmul" in n]

    for quant in ("q4f16_0", "q4f16_1"):
        assert decode_calls(quant, "x86-64-v3") and not [n for n in decode_calls(quant, "x86-64-v3") if "int16" in n]
    needs_vnni()
    assert cpu_gemv.supported(make_target("llvm"))
    assert len([n for n in decode_calls("q4f16_0", None) if "int16" in n]) == 4 * 2 + 1  # qkv, dense, h→4h, 4h→h per layer, head
    rows = decode_calls("q4f16_1", None)
    assert len([n for n in rows if "int16" in n]) == 2 and len(rows) == 4 * 2 + 1  # 4h→h per layer; the rest float


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_tasks_keep_their_scratch_on_the_stack(layout):
    """Each task's sums and prepared x group are stack arrays (cpu_gemv.SCRATCH), not a workspace
    allocation per task (q4f16_1 decode, one thread, 6.6 → 5.6 CPU ms a step at 162.5 M)."""
    from host_calls import workspace_allocs_in_tasks

    make = cpu_gemv.grouped_gemv_columns if layout == "columns" else cpu_gemv.grouped_gemv_rows
    tasks = workspace_allocs_in_tasks(_built_for_vnni(make(3072, 768, 7, "float16", "float16")))
    assert len(tasks) >= 2 and sum(tasks.values()) == 0, tasks  # preparing x, the GEMV (and the columns kernel's sum)
