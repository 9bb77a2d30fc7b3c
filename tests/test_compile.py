"""The compiled library computes GPT-NeoX as transformers does, on the tiny generated model.

Tolerances (max abs over logits; tiny-model logits are O(1)):
* q0f32: 1e-4 against transformers float32 running the weights the cache stores (float32 params
  are stored as bfloat16 by MLC's format, so the reference uses those same rounded values);
* q0f16: 2e-2 against transformers float32 on the original checkpoint (float16 activations);
* quantized modes: against transformers float32 on the *dequantized* weights — 2e-2 for f16 modes,
  1e-4 for q4f32_1 — so compile and quantization are checked together.
"""

import json
import shutil
import struct
import tarfile

import numpy as np
import pytest

from neox_mlc.common import WorkflowError
from neox_mlc.compile import make_target
from neox_mlc.convert_weight import convert
from neox_mlc.gen_config import load_templates, make_chat_config
from neox_mlc.reference import hf_logits, load_hf_model

from bundle_reference import hf_state_from_cache, in_features_of

CONTEXT = 96
PROMPT_TEXT = "ユーザー: 日本で一番高い山は何ですか?<NL>システム: 日本で一番高い山は富士山です。"
TOL = {"q0f32": 1e-4, "q0f16": 2e-2, "q4f16_0": 2e-2, "q4f16_1": 2e-2, "q4f32_1": 1e-4, "q3f16_1": 2e-2}


@pytest.fixture(scope="module")
def prompt_ids(tiny_model):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode(PROMPT_TEXT).ids


@pytest.fixture(scope="module")
def bundle(tiny_model, tmp_path_factory, compiled):
    """quant -> (lib, params dir, chat config path), built on demand."""
    root = tmp_path_factory.mktemp("tiny-bundles")
    cache = {}

    def get(quant):
        if quant not in cache:
            d = root / quant
            convert(tiny_model, quant, d / "params")
            cfg = make_chat_config(tiny_model, quant, "line_llm", load_templates()["line_llm"], CONTEXT)
            (d / "mlc-chat-config.json").write_text(json.dumps(cfg))
            cache[quant] = (compiled(d / "mlc-chat-config.json"), d / "params", d / "mlc-chat-config.json")
        return cache[quant]

    return get


def _runtime(bundle, quant):
    from neox_mlc.runtime import ModelRuntime

    lib, params, cfg = bundle(quant)
    return ModelRuntime(lib, params, cfg)


def _reference(tiny_model, bundle, quant):
    if quant == "q0f16":
        return load_hf_model(tiny_model)
    _, params, _ = bundle(quant)
    return load_hf_model(tiny_model, hf_state_from_cache(params, quant, 4, in_features_of(tiny_model)))


@pytest.mark.parametrize("quant", list(TOL))
def test_prefill_logits_match_transformers(quant, tiny_model, bundle, prompt_ids):
    rt = _runtime(bundle, quant)
    ref = hf_logits(_reference(tiny_model, bundle, quant), prompt_ids)
    ours = rt.prefill(prompt_ids)
    assert np.abs(ours - ref[-1]).max() < TOL[quant]
    rt.reset()
    all_logits = rt.prefill_all_logits(prompt_ids)
    assert np.abs(all_logits - ref).max() < TOL[quant]


@pytest.mark.parametrize("quant,dtype", [("q4f16_0", "float16"), ("q4f16_1", "float16"), ("q4f32_1", "float32")])
def test_host_prefill_unpacks_weights_in_the_model_dtype(quant, dtype, bundle):
    """Host prefill unpacks each 4-bit weight once per call into the model's dtype, rounded as MLC's
    dequantize rounds it: float16 halves the bytes written and read back (3.6 B shape q4f16_0, 64-token
    prefill, one thread: 9.0 → 7.9 CPU s); q4f32_1 stays float32. The decode kernels unpack in registers."""
    from tvm import tirx

    from neox_mlc.compile import export_module

    _, _, cfg = bundle(quant)
    mod = export_module(cfg, "llvm")[0]
    outs = [f.params[-1] for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("dequantize")]
    unpacked = [str(out.dtype) for out in outs if len(out.shape) == 2]
    assert unpacked and set(unpacked) == {dtype}, unpacked


@pytest.fixture(scope="module")
def variant_model(tmp_path_factory, fixtures_dir):
    """A GPT-NeoX unlike the tiny default in every architecture field the library reads: sequential
    residual, half-width rotary with another base, 6 heads of 16, 3 layers, another layer-norm eps,
    and a tied output head (saved without embed_out), in transformers 5's rope_parameters form."""
    import shutil

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(7)
    cfg = GPTNeoXConfig(vocab_size=1024, hidden_size=96, num_attention_heads=6, num_hidden_layers=3, intermediate_size=384,
                        rotary_pct=0.5, rotary_emb_base=5000, layer_norm_eps=1e-6, use_parallel_residual=False,
                        tie_word_embeddings=True, max_position_embeddings=256, initializer_range=0.05)
    out = tmp_path_factory.mktemp("variant") / "model"
    GPTNeoXForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(fixtures_dir / "model" / name, out / name)
    return out


@pytest.fixture(scope="module")
def long_row_model(tmp_path_factory, fixtures_dir):
    """A GPT-NeoX whose MLP down has rows of K 8192 (the 3.6 B model's is 12288): long enough that ``x``
    and one weight row no longer share L1, so host decode runs ``cpu_gemm.gemv_nt`` for it."""
    import shutil

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(11)
    cfg = GPTNeoXConfig(vocab_size=1024, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=8192,
                        max_position_embeddings=256, initializer_range=0.05)
    out = tmp_path_factory.mktemp("long-rows") / "model"
    GPTNeoXForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(fixtures_dir / "model" / name, out / name)
    return out


def test_long_row_decode_runs_the_row_gemv_and_matches_transformers(long_row_model, tmp_path, compiled):
    from cpu_flags import needs_avx512
    from host_calls import called_kernels

    from neox_mlc import cpu_gemm
    from neox_mlc.runtime import ModelRuntime

    quant = "q0f16"
    convert(long_row_model, quant, tmp_path / "params")
    cfg = tmp_path / "mlc-chat-config.json"
    cfg.write_text(json.dumps(make_chat_config(long_row_model, quant, "line_llm", load_templates()["line_llm"], CONTEXT)))

    def decode_calls(host_cpu):
        return [n for n in called_kernels(cfg, "decode", host_cpu) if "NT_matmul" in n]

    assert decode_calls("x86-64-v3") and not [n for n in decode_calls("x86-64-v3") if "rows" in n]
    needs_avx512()
    assert cpu_gemm.supported(make_target("llvm"))
    assert [n for n in decode_calls(None) if "rows" in n] == ["NT_matmul_rows"] * 2  # 4h→h of each layer; K 64 rows stay on cpu_schedule.GEMV
    rt = ModelRuntime(compiled(cfg), tmp_path / "params", cfg)
    ids = list(range(3, 43))
    ref = hf_logits(load_hf_model(long_row_model), ids)  # q0f16 against the float32 checkpoint
    rt.prefill(ids[:-1])
    stepped = rt.decode(ids[-1])
    assert np.abs(stepped - ref[-1]).max() < TOL[quant]
    rt.reset()
    assert np.abs(stepped - rt.prefill(ids)).max() < 5e-3  # prefill runs cpu_gemm.matmul_nt


@pytest.mark.parametrize("quant", ["q0f32", "q4f16_0"])
def test_variant_architecture_matches_transformers(quant, variant_model, tmp_path, compiled):
    from neox_mlc.hf_checkpoint import TensorIndex

    assert "embed_out.weight" not in TensorIndex(variant_model).tensors  # tied: the head is the embedding
    convert(variant_model, quant, tmp_path / "params")
    cfg = make_chat_config(variant_model, quant, "line_llm", load_templates()["line_llm"], CONTEXT)
    mc = cfg["model_config"]
    assert (mc["use_parallel_residual"], mc["rotary_pct"], mc["position_embedding_base"], mc["head_dim"]) == (False, 0.5, 5000, 16)
    (tmp_path / "mlc-chat-config.json").write_text(json.dumps(cfg))
    from neox_mlc.runtime import ModelRuntime

    rt = ModelRuntime(compiled(tmp_path / "mlc-chat-config.json"), tmp_path / "params", tmp_path / "mlc-chat-config.json")
    model = load_hf_model(variant_model, hf_state_from_cache(tmp_path / "params", quant, 6, in_features_of(variant_model)))
    ids = list(range(3, 43))
    ref = hf_logits(model, ids)
    assert np.abs(rt.prefill_all_logits(ids) - ref).max() < TOL[quant]
    rt.reset()
    rt.prefill(ids[:-1])
    assert np.abs(rt.decode(ids[-1]) - ref[-1]).max() < TOL[quant]


def test_q0f32_32_greedy_tokens_identical(tiny_model, bundle, prompt_ids):
    import torch

    rt = _runtime(bundle, "q0f32")
    model = _reference(tiny_model, bundle, "q0f32")
    logits = rt.prefill(prompt_ids)
    ours = []
    for _ in range(32):
        ours.append(int(logits.argmax()))
        logits = rt.decode(ours[-1])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert ours == out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("quant", ["q0f32", "q4f16_1", "q4f16_0"])
def test_decode_after_prefill_equals_fresh_prefill(quant, bundle, prompt_ids):
    """Decode runs other kernels than prefill (q4f16_0 on a VNNI host: int16 activations, cpu_gemv)."""
    rt = _runtime(bundle, quant)
    rt.prefill(prompt_ids[:-1])
    stepped = rt.decode(prompt_ids[-1])
    rt.reset()
    fresh = rt.prefill(prompt_ids)
    assert np.abs(stepped - fresh).max() < (1e-5 if quant == "q0f32" else 5e-3)


def test_decode_switching_thread_counts_is_bit_identical_and_reaches_tvm(bundle, prompt_ids):
    """The adaptive thread count (runtime.ThreadChooser) moves rows between threads, nothing else."""
    import tvm

    rt = _runtime(bundle, "q4f16_0")
    if rt.max_threads < 2:
        pytest.skip("needs 2 usable CPUs")
    num_threads = tvm.get_global_func("runtime.NumThreads")
    rt.set_threads(1)
    assert num_threads() == 1
    rt.chooser.candidates = [1]  # fixed: one thread
    logits, fixed = rt.prefill(prompt_ids), []
    for _ in range(6):
        fixed.append(rt.decode(int(logits.argmax())))
        logits = fixed[-1]
    rt.reset()
    rt.chooser = type(rt.chooser)([rt.max_threads, 1], probe_steps=1, period=0)  # a probe every step: 2, 1, 2, ...
    seen = set()
    logits = rt.prefill(prompt_ids)
    for want in fixed:
        seen.add(rt.chooser.next_threads())
        logits = rt.decode(int(logits.argmax()))
        assert np.array_equal(logits, want)
    assert seen == {1, rt.max_threads} and num_threads() in seen


def test_kernel_profile_names_the_kernels_of_a_decode_step(bundle):
    from neox_mlc.runtime import kernel_profile

    rt = _runtime(bundle, "q4f16_0")
    r = kernel_profile(rt, steps=2, prompt=8)
    by_name = {k["name"]: k for k in r["kernels"]}
    head = [k for n, k in by_name.items() if "NT_matmul" in n and k["calls_per_step"] == 1]
    assert head, f"no output-head matmul among {sorted(by_name)}"
    layers = rt.chat_config["model_config"]["num_hidden_layers"]
    assert by_name["vm.builtin.attention_kv_cache_attention_with_fused_qkv"]["calls_per_step"] == layers
    assert sum(k["cpu_ms_per_step"] for k in r["kernels"]) <= r["step_cpu_ms"] + 0.05
    assert rt.decode(5).shape == (rt.chat_config["vocab_size"],)  # the instrument is removed afterwards


def _lowered_kernels(cfg, device, cuda=None, prefix="p_"):
    """(kernel names each Relax function calls, PrimFuncs) of the library as compile.build lowers it."""
    import tvm
    from tvm import relax, tirx

    from neox_mlc.compile import export_module, pipeline

    mod, _, target, _ = export_module(cfg, device, prefix, cuda=cuda)
    with target:
        lowered = pipeline(target)(mod)
    prims = {gv.name_hint: f for gv, f in lowered.functions.items() if isinstance(f, tirx.PrimFunc)}

    def called(fn):
        names = []

        def visit(e):
            if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.GlobalVar) and e.op.name_hint in prims:
                names.append(e.op.name_hint)

        relax.analysis.post_order_visit(lowered[fn], visit)
        return names

    return {fn: called(fn) for fn in ("prefill", "decode")}, prims


@pytest.mark.parametrize("quant,device", [("q4f16_1", "llvm"), ("q4f16_0", "llvm"), ("q0f16", "llvm"), ("q4f16_1", "iphone")])
def test_weights_are_read_as_stored_never_transposed_or_unpacked_per_call(quant, device, bundle):
    """A per-call transpose or a separate dequantize of every weight made decode ~10x slower (and
    costs an iPhone the same memory traffic): decode must read each weight once, as stored."""
    from tvm import tirx

    _, _, cfg = bundle(quant)
    calls, prims = _lowered_kernels(cfg, device)
    for fn, names in calls.items():
        assert not [n for n in names if "transpose" in n], fn
    matmuls = [n for n in calls["decode"] if "NT_matmul" in n]
    assert len(matmuls) == 4 * 2 + 1  # qkv, dense, h→4h, 4h→h per layer (2 layers), head
    if quant != "q0f16":
        assert all("dequantize_NT_matmul" in n for n in matmuls)
        assert not [n for n in calls["decode"] if "dequantize" in n and "NT_matmul" not in n]
    if device == "llvm":  # every host matmul kernel got a (parallel) schedule
        for name, func in prims.items():
            if "NT_matmul" in name:
                loops = []
                tirx.stmt_functor.post_order_visit(func.body, lambda s, loops=loops: loops.append(s.kind) if isinstance(s, tirx.For) else None)
                assert tirx.ForKind.PARALLEL in loops, name


def test_params_move_to_huge_pages_with_the_same_values(bundle, prompt_ids, monkeypatch):
    """The runtime copies parameters into one mapping advised for transparent huge pages (runtime.on_huge_pages)."""
    from pathlib import Path

    rt = _runtime(bundle, "q4f16_0")
    monkeypatch.setenv("NEOX_MLC_HUGE_PAGES", "0")
    plain = _runtime(bundle, "q4f16_0")
    assert np.array_equal(rt.prefill(prompt_ids), plain.prefill(prompt_ids))
    addresses = [np.from_dlpack(t).ctypes.data for t in rt.params]
    assert all(a % 4096 == 0 for a in addresses) and addresses == sorted(addresses)
    if "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        return
    mapping = None
    for block in Path("/proc/self/smaps").read_text().split("\n"):
        head = block.split()[0] if block and "-" in block.split()[0] and ":" not in block.split()[0] else None
        if head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            mapping = lo <= addresses[0] < hi
        elif mapping and block.startswith("THPeligible:"):
            assert block.split()[1] == "1"
            return
    raise AssertionError("no THPeligible line for the parameters' mapping")


def test_sequence_longer_than_context_window_is_refused(bundle):
    rt = _runtime(bundle, "q0f16")
    with pytest.raises(WorkflowError, match=rf"sequence of {CONTEXT + 1} tokens exceeds the context window {CONTEXT}"):
        rt.prefill([5] * (CONTEXT + 1))
    rt.prefill([5] * CONTEXT)
    with pytest.raises(WorkflowError, match="exceeds the context window"):
        rt.decode(5)


@pytest.mark.parametrize("device", ["iphone", "metal"])
def test_apple_targets_are_arm64_macho_archives_with_prefixed_symbols(device, bundle, tmp_path):
    from neox_mlc.compile import build

    _, _, cfg = bundle("q4f16_0")
    out = tmp_path / f"lib-{device}.tar"
    build(cfg, device, out, "tiny_q4f16_0_")
    with tarfile.open(out) as tar:
        members = tar.getmembers()
        assert members and all(m.name.endswith(".o") for m in members)
        blobs = {m.name: tar.extractfile(m).read() for m in members}
    for name, blob in blobs.items():
        magic, cputype = struct.unpack("<Ii", blob[:8])
        assert magic == 0xFEEDFACF and cputype == 0x0100000C, name  # MH_MAGIC_64, CPU_TYPE_ARM64
    text = b"".join(blobs.values())
    # host kernels are registered under the prefix; GPU kernels are Metal source; the Relax VM
    # program (prefill, decode, ...) is embedded as the library binary.
    assert b"_.tvm_func.tiny_q4f16_0_fused_" in text
    assert b"kernel void tiny_q4f16_0_" in text
    assert b"create_tir_paged_kv_cache" in text and b"batch_prefill" in text


def test_vulkan_is_refused_with_reason():
    with pytest.raises(WorkflowError, match="no SPIR-V"):
        make_target("vulkan")


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on this machine")


@needs_nvcc
def test_cuda_library_holds_sm90_machine_code_not_source(bundle, tmp_path):
    """cuda: kernels are nvcc-compiled at build time into a fatbin of SASS for the default arch
    (sm_90), so a runtime-only TVM loads them without any compiler; no CUDA source is shipped."""
    from neox_mlc.compile import build
    from neox_mlc.cuda_kernels import cuda_kernels_of

    _, _, cfg = bundle("q4f16_1")
    out = tmp_path / "lib-cuda.so"
    meta = build(cfg, "cuda", out)
    assert out.read_bytes()[:4] == b"\x7fELF" and meta["quantization"] == "q4f16_1"
    kernels = cuda_kernels_of(out)
    assert kernels["format"] == "fatbin" and kernels["entries"] == ["sm_90"], kernels
    assert kernels["kernels"] > 40
    assert b"CUDA_UNSUPPORTED_HALF_MATH" not in out.read_bytes()  # TVM's CUDA source preamble


@needs_nvcc
def test_iphone_proxy_cuda_library_builds_for_every_requested_arch(bundle, tmp_path):
    from neox_mlc.compile import CudaOptions, build
    from neox_mlc.cuda_kernels import cuda_kernels_of

    _, _, cfg = bundle("q4f16_0")
    out = tmp_path / "lib-proxy.so"
    build(cfg, "cuda", out, cuda=CudaOptions(("sm_90", "sm_80"), iphone_proxy=True))
    kernels = cuda_kernels_of(out)
    assert kernels["format"] == "fatbin" and sorted(kernels["entries"]) == ["sm_80", "sm_90"], kernels


@needs_nvcc
def test_q0f16_cuda_compile_of_a_hidden_768_model_finishes(tmp_path, fixtures_dir):
    """apache-tvm 0.26's wmma Tensorize segfaulted compiling every float16 matmul with all dims > 64
    (the tiny model's are 64, so only real widths hit it). In a child process: a crash fails the test."""
    import subprocess
    import sys

    cfg = json.loads((fixtures_dir / "q0f16" / "mlc-chat-config.json").read_text())
    cfg["model_config"].update(hidden_size=768, intermediate_size=3072, num_attention_heads=12, head_dim=64, context_window_size=256, prefill_chunk_size=256)
    cfg.update(context_window_size=256, prefill_chunk_size=256)
    (tmp_path / "mlc-chat-config.json").write_text(json.dumps(cfg))
    out = tmp_path / "lib.so"
    proc = subprocess.run([sys.executable, "-m", "neox_mlc.cli", "compile", str(tmp_path / "mlc-chat-config.json"), "--device", "cuda", "-o", str(out)],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from neox_mlc.cuda_kernels import cuda_kernels_of

    assert cuda_kernels_of(out)["entries"] == ["sm_90"]


def test_iphone_proxy_schedules_every_kernel_exactly_as_the_iphone_target(bundle):
    """The proxy's kernels are the iPhone's scheduled TIR, kernel for kernel (dlight picks tile
    sizes by target kind, so equal limits alone would not do); only code generation differs."""
    import tvm_ffi

    from neox_mlc.compile import CudaOptions, iphone_gpu_target, make_target

    _, _, cfg = bundle("q4f16_1")
    _, iphone = _lowered_kernels(cfg, "iphone", prefix="")
    _, proxy = _lowered_kernels(cfg, "cuda", CudaOptions(iphone_proxy=True))
    assert sorted(proxy) == sorted(iphone)
    assert [n for n in iphone if not tvm_ffi.structural_equal(iphone[n], proxy[n])] == []
    _, cuda = _lowered_kernels(cfg, "cuda")
    assert [n for n in cuda if "NT_matmul" in n and n in iphone and not tvm_ffi.structural_equal(iphone[n], cuda[n])]  # plain CUDA differs
    codegen, phone = make_target("cuda", cuda=CudaOptions(iphone_proxy=True)), iphone_gpu_target()
    assert codegen.kind.name == "cuda"
    for key in ("max_num_threads", "max_threads_per_block", "max_shared_memory_per_block", "thread_warp_size"):
        assert int(codegen.attrs[key]) == int(phone.attrs[key]), key
    assert int(phone.attrs["thread_warp_size"]) == 1 and int(phone.attrs["max_shared_memory_per_block"]) == 32768


def test_cuda_options_are_checked_before_any_work(monkeypatch, tmp_path):
    from neox_mlc.compile import CudaOptions, build, cuda_options

    with pytest.raises(WorkflowError, match=r"CUDA arch 'sm90' is not valid; allowed: sm_NN"):
        CudaOptions(("sm90",))
    with pytest.raises(WorkflowError, match="apply to device cuda only, not 'llvm'"):
        cuda_options("llvm", None, True)
    assert CudaOptions(("sm_90", "sm_80", "sm_90")).archs == ("sm_80", "sm_90")
    assert make_target("cuda").attrs["arch"] == "sm_90"
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(WorkflowError, match="needs the CUDA toolkit's nvcc"):
        build(tmp_path / "missing.json", "cuda", tmp_path / "lib.so")
