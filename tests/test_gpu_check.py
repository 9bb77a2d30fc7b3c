"""The GPU check's logic, on the host: llvm libraries stand in for the CUDA ones (CI has no GPU).

The run goes through a runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``, as on the GPU machine), in a
child process so the compiler library is never loaded there.
"""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from neox_mlc.common import REPO_ROOT, WorkflowError
from neox_mlc.cuda_kernels import compile_library_blob, fatbin_entries, join_library_blob, split_cuda_payload, split_library_blob
from neox_mlc.gpu_check import conformance, prepare, weight_bytes_per_decode_step


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A CPU check folder: both fixtures' llvm libraries and the tiny speed shape (q4f16_1)."""
    from neox_mlc.gpu_check import TINY_SHAPE

    out = tmp_path_factory.mktemp("gpu-check") / "check"
    prepare(out, "llvm", [], {"tiny": TINY_SHAPE}, ["q4f16_1"])
    return out


def test_cpu_mode_runs_runtime_only_and_matches_mlc(prepared, tmp_path):
    report_path = tmp_path / "report.json"
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "neox_mlc.cli", "gpu_check", "run", str(prepared), "--device", "cpu", "--prompt", "16", "--decode", "4",
           "--bandwidth-tbs", "0.1", "-o", str(report_path)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["tvm_runtime_only"] is True  # nothing of TVM's compiler was needed
    assert sorted(report["conformance"]) == ["q0f16/llvm", "q4f16_1/llvm"]
    for name, res in report["conformance"].items():
        assert res["pass"] and res["greedy_identical"] and res["prefill_max_abs"] <= 5e-3 and res["decode_max_abs"] <= 5e-3, name
    tiny = report["speed"]["tiny"]
    q = tiny["q4f16_1"]
    assert q["prompt_tokens"] == 16 and q["decode_tokens"] == 4 and q["decode_tok_s"] > 0 and q["prefill_tok_s"] > 0
    meta = json.loads((prepared / "manifest.json").read_text())
    assert meta["shapes"]["tiny"]["quants"]["q4f16_1"]["lib"].endswith("-llvm.so")
    assert q["bandwidth_bound_decode_tok_s"] == pytest.approx(0.1e12 / q["weight_bytes_per_decode_step"])
    assert q["decode_fraction_of_bound"] == pytest.approx(q["decode_tok_s"] / q["bandwidth_bound_decode_tok_s"])
    assert tiny["transformers"]["decode_tok_s"] > 0
    assert tiny["decode_vs_transformers"]["q4f16_1"] == pytest.approx(q["decode_tok_s"] / tiny["transformers"]["decode_tok_s"])
    assert report["goals"]["logits_within_5e-3_and_greedy_identical"] is True


def test_conformance_fails_when_logits_drift(prepared, tmp_path):
    """The check can fail: MLC's decode logits nudged by 1e-2 in one place."""
    fixture = tmp_path / "q4f16_1"
    shutil.copytree(prepared / "fixtures" / "q4f16_1", fixture)
    ref = np.load(fixture / "decode_logits_q4f16_1.npy")
    ref[3, 17] += 1e-2
    np.save(fixture / "decode_logits_q4f16_1.npy", ref)
    inputs = json.loads((prepared / "inputs.json").read_text())["input_ids"]
    res = conformance(prepared / "libs" / "fixture-q4f16_1-llvm.so", fixture, inputs, "cpu")
    assert res["greedy_identical"] and res["decode_max_abs"] > 5e-3 and res["pass"] is False


def test_weight_bytes_per_decode_step_skip_only_the_input_embedding():
    params = [
        {"name": "gpt_neox.embed_in.q_weight", "shape": [100, 8], "dtype": "uint32"},
        {"name": "gpt_neox.embed_in.q_scale", "shape": [100, 2], "dtype": "float16"},
        {"name": "gpt_neox.layers.0.attention.query_key_value.q_weight", "shape": [192, 8], "dtype": "uint32"},
        {"name": "gpt_neox.layers.0.input_layernorm.weight", "shape": [64], "dtype": "float16"},
        {"name": "embed_out.weight", "shape": [100, 64], "dtype": "float16"},
    ]
    assert weight_bytes_per_decode_step(params) == 192 * 8 * 4 + 64 * 2 + 100 * 64 * 2


def _str(b):
    return struct.pack("<Q", len(b)) + b


def test_library_blob_cuda_source_is_swapped_for_the_fatbin_and_nothing_else():
    """TVM's serialized module tree, rebuilt by hand: host library, a VM executable, a CUDA module."""
    fmap = struct.pack("<Q", 1) + _str(b"k_kernel") + _str(b"k_kernel") + struct.pack("<Q", 1) + b"\x03\x40\x01\x00"
    fmap += struct.pack("<Q", 1) + _str(b"threadIdx.x") + struct.pack("<Q", 1) + b"\x00" * 4
    cuda = _str(b"cuda") + fmap + _str(b"extern \"C\" __global__ void k_kernel() {}")
    tree = struct.pack("<Q", 4) + struct.pack("<4Q", 0, 1, 2, 2) + struct.pack("<Q", 2) + struct.pack("<2Q", 1, 2)
    body = tree + _str(b"relax.VMExecutable") + _str(b"vm-bytes") + _str(b"_lib") + _str(b"cuda") + _str(cuda)
    blob = struct.pack("<Q", len(body)) + body
    got_tree, modules = split_library_blob(blob)
    assert got_tree == tree and [k for k, _ in modules] == ["relax.VMExecutable", "_lib", "cuda"]
    assert join_library_blob(got_tree, modules) == blob
    fake_fatbin = struct.pack("<IHHQ", 0xBA55ED50, 1, 16, 40) + struct.pack("<HHIQ", 2, 0x101, 40, 0) + struct.pack("<IIHHI", 0, 0, 8, 1, 90) + b"\x00" * 4
    seen = []
    out = compile_library_blob(blob, lambda src: seen.append(src) or fake_fatbin)
    assert seen == ['extern "C" __global__ void k_kernel() {}']
    _, new = split_library_blob(out)
    assert new[:2] == modules[:2]
    fmt, new_fmap, code, names = split_cuda_payload(new[2][1])
    assert (fmt, new_fmap, code, names) == ("fatbin", fmap, fake_fatbin, ["k_kernel"])
    assert fatbin_entries(code) == ["sm_90"]


def test_prepare_refuses_unknown_device_and_shape(tmp_path):
    from neox_mlc.gpu_check import main

    with pytest.raises(WorkflowError, match="prepare device 'rocm' is not supported; allowed: cuda, llvm"):
        prepare(tmp_path / "x", "rocm", [], {}, [])
    with pytest.raises(WorkflowError, match="shape '7b' is not known"):
        main(["prepare", str(tmp_path / "x"), "--device", "llvm", "--shapes", "7b"])
    assert not (tmp_path / "x").exists()
