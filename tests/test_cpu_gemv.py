"""The host library's integer-dot-product decode GEMV (neox_mlc/cpu_gemv.py) against numpy.

The kernel quantizes ``x`` to int16 per group of 32 (scale ``max|x| / 32767``), so each product may be
off by at most ``|W[j, k]| · max|x|_group / 65534``; the test holds every output to that bound (plus
float32 rounding), which a wrong lane, pair or group — or int8 activations — would break.
"""

import numpy as np
import pytest

from neox_mlc import cpu_gemv
from neox_mlc.compile import make_target


def _needs_vnni():
    """Skip where this CPU (``/proc/cpuinfo``, not the target the code under test makes) lacks AVX-512 BW + VNNI."""
    from pathlib import Path

    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if not {"avx512bw", "avx512_vnni"} <= flags:
        pytest.skip("this CPU has no AVX-512 VNNI: the host library keeps its float kernels")


def _dequantized(qw: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """``W[k, n]`` of words ``[K/8, N]`` and scales ``[K/32, N]`` (MLC's q4f16_0 layout), in float64."""
    k8, n = qw.shape
    codes = np.stack([(qw >> np.uint32(4 * e)) & np.uint32(15) for e in range(8)], axis=1).reshape(k8 * 8, n)
    return (codes.astype(np.float64) - 7) * np.repeat(qs.astype(np.float64), 32, axis=0)


@pytest.mark.parametrize("k,n,batch,x_dtype", [(64, 64, 1, "float16"), (256, 192, 2, "float32"), (3072, 768, 1, "float16")])
def test_int16_gemv_is_within_the_int16_rounding_bound_of_the_exact_product(k, n, batch, x_dtype):
    import tvm

    _needs_vnni()
    rng = np.random.default_rng(k + n)
    x = (rng.standard_normal((batch, 1, k)) * np.where(rng.random(k) < 0.05, 30.0, 1.0)).astype(x_dtype)  # a few outliers
    qw = rng.integers(0, 2**32, (k // 8, n), dtype=np.uint32) & np.uint32(0xEEEEEEEE)  # codes 0..14, as MLC writes them
    qs = (rng.random((k // 32, n)) * 0.02).astype(np.float16)
    func = cpu_gemv.grouped_gemv_columns(k, n, 7, x_dtype, "float16").with_attr("global_symbol", "main")
    ex = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"]}))
    out = tvm.runtime.tensor(np.zeros((batch, 1, n), np.float32))
    ex(*[tvm.runtime.tensor(a) for a in (x, qw, qs)], out)
    w = _dequantized(qw, qs)
    xs = x.reshape(batch, k).astype(np.float64)
    exact = xs @ w
    group_max = np.repeat(np.abs(xs).reshape(batch, k // 32, 32).max(axis=2), 32, axis=1)
    bound = (group_max / 65534) @ np.abs(w) + 1e-5 * (np.abs(xs) @ np.abs(w))
    err = np.abs(out.numpy().reshape(batch, n) - exact)
    assert (err <= bound).all(), f"max excess {(err - bound).max()}"
    assert err.max() > 0  # int16 activations, not a float path


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
    """The default host target adds +avx512vnni on a VNNI CPU, and q4f16_0 decode then calls the
    kernel; an x86-64-v3 build (no AVX-512) keeps the float GroupedGEMV."""
    import json

    from tvm import relax

    from neox_mlc.compile import export_module
    from neox_mlc.gen_config import load_templates, make_chat_config

    cfg = tmp_path / "mlc-chat-config.json"
    cfg.write_text(json.dumps(make_chat_config(tiny_model, "q4f16_0", "line_llm", load_templates()["line_llm"], 64)))

    def decode_calls(host_cpu):
        mod = export_module(cfg, "llvm", host_cpu=host_cpu)[0]
        names = []
        relax.analysis.post_order_visit(mod["decode"], lambda e: names.append(e.args[0].name_hint) if isinstance(e, relax.Call) and e.args and hasattr(e.args[0], "name_hint") else None)
        return [n for n in names if "NT_matmul" in n]

    assert decode_calls("x86-64-v3") and not [n for n in decode_calls("x86-64-v3") if "int16" in n]
    _needs_vnni()
    assert cpu_gemv.supported(make_target("llvm"))
    assert len([n for n in decode_calls(None) if "int16" in n]) == 4 * 2 + 1  # qkv, dense, h→4h, 4h→h per layer, head
