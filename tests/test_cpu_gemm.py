"""The host library's float-weight kernels (neox_mlc/cpu_gemm.py: prefill matmul, long-row GEMV) against numpy, and where the model uses them."""

import numpy as np
import pytest
from cpu_flags import needs_avx512

from neox_mlc import cpu_gemm
from neox_mlc.compile import make_target


def _assert_equals_float64_product(func, x, w):
    """``func`` (x ``[B, S, K]``, w ``[N, K]`` → float32 ``[B, S, N]``) built for x86-64-v4: every output
    written (the buffer starts as NaN) and within 1e-6 of the float64 product's absolute sum."""
    import tvm

    (batch, seq, k), n = x.shape, w.shape[0]
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4"}))
    out = tvm.runtime.tensor(np.full((batch, seq, n), np.nan, np.float32))
    ex(tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    rows, weights = x.reshape(batch * seq, k).astype(np.float64), w.astype(np.float64)
    bound = 1e-6 * (np.abs(rows) @ np.abs(weights).T) + 1e-6
    err = np.abs(out.numpy().reshape(batch * seq, n) - rows @ weights.T)
    assert (err <= bound).all(), f"max excess {(err - bound).max()}"


@pytest.mark.parametrize(
    "k,n,batch,seq,dtype",
    [
        (64, 64, 1, 7, "float16"),  # 7 tokens: one tile of 4 and 3 left over
        (3072, 128, 1, 8, "float16"),  # one K block
        (6144, 64, 2, 5, "float32"),  # two K blocks, two sequences, q0f32 / q4f32 weights
        (768, 192, 1, 1, "float16"),  # a single token (the output head of a one-token prefill)
    ],
)
def test_tiled_matmul_equals_the_float64_product(k, n, batch, seq, dtype):
    needs_avx512()
    rng = np.random.default_rng(k + n + seq)
    x = rng.standard_normal((batch, seq, k)).astype(dtype)
    w = (rng.standard_normal((n, k)) * 0.05).astype(dtype)
    _assert_equals_float64_product(cpu_gemm.matmul_nt(k, n, dtype, dtype), x, w)


@pytest.mark.parametrize(
    "k,n,batch,dtype",
    [
        (8192, 64, 1, "float16"),  # the shortest float16 rows it serves
        (12288, 24, 2, "float16"),  # the 3.6 B model's MLP down rows, two sequences
        (4096, 16, 3, "float32"),  # q0f32: float32 rows are long from K 4096
    ],
)
def test_row_gemv_equals_the_float64_product(k, n, batch, dtype):
    needs_avx512()
    rng = np.random.default_rng(k + n)
    x = rng.standard_normal((batch, 1, k)).astype(dtype)
    w = (rng.standard_normal((n, k)) * 0.05).astype(dtype)
    _assert_equals_float64_product(cpu_gemm.gemv_nt(k, n, dtype, dtype), x, w)


def test_row_gemv_serves_rows_that_crowd_l1_with_x():
    assert cpu_gemm.gemv_applies(12288, 3072, "float16", "float16") and cpu_gemm.gemv_applies(8192, 64, "float16", "float16")
    assert not cpu_gemm.gemv_applies(6144, 3072, "float16", "float16")  # 24 KiB: x stays in L1 (32 GB/s a thread as it is)
    assert not cpu_gemm.gemv_applies(3072, 12288, "float32", "float32") and cpu_gemm.gemv_applies(4096, 12288, "float32", "float32")
    assert not cpu_gemm.gemv_applies(12288, 3076, "float16", "float16") and not cpu_gemm.gemv_applies(12300, 3072, "float16", "float16")


def test_k_blocks_and_task_rows():
    assert cpu_gemm.k_block(3072) == 3072 and cpu_gemm.k_block(12288) == 3072 and cpu_gemm.k_block(768) == 768 and cpu_gemm.k_block(64) == 64
    assert cpu_gemm.applies(3072, 9216) and cpu_gemm.applies(12288, 3072) and cpu_gemm.applies(768, 50432) and cpu_gemm.applies(64, 192)
    assert not cpu_gemm.applies(3072, 100) and not cpu_gemm.applies(40, 64)


@pytest.mark.parametrize("quant", ["q0f16", "q4f16_1"])
def test_host_prefill_uses_the_tiled_matmul_only_with_avx512(tmp_path, tiny_model, quant):
    """The default host target (x86-64-v4 on an AVX-512 CPU) runs every multi-token prefill matmul of
    the tiny model through cpu_gemm; an x86-64-v3 build keeps cpu_schedule.Matmul."""
    import json

    from host_calls import called_kernels

    from neox_mlc.gen_config import load_templates, make_chat_config

    cfg = tmp_path / "mlc-chat-config.json"
    cfg.write_text(json.dumps(make_chat_config(tiny_model, quant, "line_llm", load_templates()["line_llm"], 64)))

    def prefill_calls(host_cpu):
        return [n for n in called_kernels(cfg, "prefill", host_cpu) if "matmul" in n.lower()]

    assert prefill_calls("x86-64-v3") and not [n for n in prefill_calls("x86-64-v3") if "tiled" in n]
    needs_avx512()
    assert cpu_gemm.supported(make_target("llvm"))
    tiled = [n for n in prefill_calls(None) if "tiled" in n]
    assert len(tiled) == 4 * 2, prefill_calls(None)  # qkv, dense, h→4h, 4h→h per layer (the head sees one token a sequence)
