"""``compile``: build the GPT-NeoX model library from ``mlc-chat-config.json`` with TVM Relax.

Mirrors ``mlc_llm compile CHAT_CONFIG --device D -o LIB``. apache-tvm is pinned to 0.26.0 on
purpose: MLC-LLM's current source (commit 79d603f) runs on 0.26 and breaks on 0.27's API moves, the
reference fixtures were made with 0.26.0, and 0.27 drops the string target tags (its targets are JSON
dicts). The ``iphone`` target is spelled out here as MLC defines it — Metal kernels for an A-series
GPU, arm64 iOS host code — because no TVM release ships an ``iphone`` tag.

Targets and outputs: ``llvm``/``cpu`` → host shared library (``.so``); ``iphone`` → ``.tar`` of arm64
Mach-O objects plus Metal kernel source, with every symbol under ``--system-lib-prefix`` so Xcode can
link several models into one app; ``metal`` → the same for arm64 macOS; ``cuda`` → ``.so`` whose
kernels are SASS in a fatbin, built with nvcc for ``--cuda-arch`` (default sm_90; no GPU needed to
build, nothing compiled at load: see neox_mlc/cuda_kernels.py); ``--iphone-proxy`` builds that CUDA
library with exactly the iPhone's GPU schedule rules and limits, so a CUDA GPU runs the kernels an
iPhone runs; ``vulkan`` is refused with the reason (the PyPI TVM has no SPIR-V backend).
The library carries ``_metadata`` (JSON, same keys as MLC's) with the parameter list the runtime
loads, in order.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neox_mlc.common import WorkflowError, atomic_path, check_output, read_json, run_cli, run_mlc_llm
from neox_mlc.cuda_kernels import DEFAULT_ARCHS, fatbin_pack_imports, parse_archs, require_nvcc
from neox_mlc.layout import LIB_EXT, TARGETS, UNBUILDABLE
from neox_mlc.quantization import get_quantization

_APPLE_GPU = {"kind": "metal", "max_threads_per_block": 256, "max_shared_memory_per_block": 32768, "thread_warp_size": 1}
# The target attributes dlight and TVM's attention kernels size their schedules by.
SCHEDULE_LIMITS = ("max_num_threads", "max_threads_per_block", "max_shared_memory_per_block", "thread_warp_size")
HOSTS = {
    "iphone": {"kind": "llvm", "mtriple": "arm64-apple-ios14.0", "mcpu": "apple-a14"},
    "metal": {"kind": "llvm", "mtriple": "arm64-apple-macos11.0", "mcpu": "apple-m1"},
}


def _cpu_flags() -> set[str]:
    """This x86-64 host's ``/proc/cpuinfo`` flags (empty elsewhere)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return set()
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def default_host_cpu() -> str | None:
    """The x86-64 level of this host: ``x86-64-v4`` (AVX-512) or ``x86-64-v3`` (AVX2, FMA, F16C), else generic.

    Why: without F16C every float16 load is a libcall (the tiny model's float16 modes ran ~18x slower
    on the generic build), and the 4-bit decode kernels keep twice the outputs in registers with
    AVX-512 (162.5 M q4f16_0, one thread: 86 → 109 tok/s). A level, not ``native``: the library runs on
    any CPU of that level; build with ``--host-cpu x86-64-v3`` for a library that must also run on
    CPUs without AVX-512 (llama.cpp's ``GGML_NATIVE`` makes the same choice by default).
    """
    flags = _cpu_flags()
    if not {"avx2", "fma", "f16c"} <= flags:
        return None
    return "x86-64-v4" if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags else "x86-64-v3"


def default_host_features() -> list[str]:
    """LLVM features added to :func:`default_host_cpu`'s level: ``+avx512vnni`` where this AVX-512 host has it.

    Why: x86-64-v4 leaves VNNI out, and ``neox_mlc/cpu_gemv.py``'s decode GEMVs need it (3.6 B shape
    q4f16_0 and q4f16_1 decode, see that module). An explicit ``--host-cpu`` gets its CPU's own features only.
    """
    return ["+avx512vnni"] if default_host_cpu() == "x86-64-v4" and "avx512_vnni" in _cpu_flags() else []


@dataclass(frozen=True)
class CudaOptions:
    """How ``cuda`` is built: the SASS archs in the fatbin, and whether it proxies the iPhone's schedules."""

    archs: tuple[str, ...] = DEFAULT_ARCHS
    iphone_proxy: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "archs", parse_archs(self.archs))  # checked and sorted before any work


def make_target(device: str, host_cpu: str | None = None, cuda: CudaOptions | None = None) -> Any:
    """The TVM target for a device name (see module docstring).

    The CUDA target's ``arch`` is the lowest requested one: TVM chooses instructions by it, so the
    source compiles for every arch in the list.
    """
    from tvm.target import Target

    if device not in TARGETS:
        raise WorkflowError(f"unknown device {device!r}; allowed: {', '.join(TARGETS)}")
    if cuda and cuda.iphone_proxy and device != "cuda":
        raise WorkflowError(f"the iPhone proxy build emits CUDA: use it with device cuda, not {device!r}")
    if device in ("llvm", "cpu"):
        cpu = host_cpu or default_host_cpu()
        mattr = [] if host_cpu else default_host_features()
        return Target({"kind": "llvm", **({"mcpu": cpu} if cpu else {}), **({"mattr": mattr} if mattr else {})})
    if device in HOSTS:
        return Target(_APPLE_GPU, host=HOSTS[device])
    if device == "cuda":
        cuda = cuda or CudaOptions()
        # 48 KiB: the static shared memory any CUDA GPU gives a block (TVM assumes it, with a warning, if unset)
        limits = {k: iphone_gpu_target().attrs[k] for k in SCHEDULE_LIMITS} if cuda.iphone_proxy else {"max_shared_memory_per_block": 49152}
        return Target({"kind": "cuda", "arch": cuda.archs[0], **limits}, host="llvm")
    raise WorkflowError(f"device {device!r} cannot be built with this TVM: {UNBUILDABLE.get(device, 'no codegen')}")


def iphone_gpu_target(host: Any = None) -> Any:
    """The iPhone's GPU target as TVM resolves it (the proxy build schedules for it)."""
    from tvm.target import Target

    return Target(_APPLE_GPU, host=host or HOSTS["iphone"])


def schedule_target(target: Any, cuda: CudaOptions | None) -> Any:
    """The target the model's kernels are generated and scheduled for; ``target`` compiles them.

    Why two: dlight's rules pick tile sizes and thread layouts by target *kind* (GEMV: 2x64 or 4x16
    threads on Metal, 16x32 on CUDA; GeneralReduction: 64 vs 256 threads), so the iPhone's schedules
    exist only for a Metal target. The proxy schedules for the iPhone's GPU target and hands the
    scheduled kernels to the CUDA code generator, whose target carries the same limits.
    """
    return iphone_gpu_target(target.host) if cuda and cuda.iphone_proxy else target


def metadata(chat_config: dict[str, Any], params: list[tuple[str, Any]], memory_usage: dict[str, int]) -> dict[str, Any]:
    """``_metadata`` content, key for key as MLC's model libraries carry it."""
    mc = chat_config["model_config"]
    return {
        "model_type": chat_config["model_type"],
        "quantization": chat_config["quantization"],
        "context_window_size": chat_config["context_window_size"],
        "sliding_window_size": chat_config["sliding_window_size"],
        "attention_sink_size": chat_config["attention_sink_size"],
        "prefill_chunk_size": chat_config["prefill_chunk_size"],
        "tensor_parallel_shards": chat_config["tensor_parallel_shards"],
        "pipeline_parallel_stages": chat_config["pipeline_parallel_stages"],
        "disaggregation": False,
        "kv_state_kind": "kv_cache",
        "max_batch_size": mc.get("max_batch_size", 128),
        "active_vocab_size": chat_config["active_vocab_size"],
        "model_task": chat_config.get("model_task", "chat"),
        "params": [
            {"name": name, "shape": [int(d) for d in p.shape], "dtype": p.dtype, "preprocs": [], "pipeline_stages": [0]}
            for name, p in params
        ],
        "kv_cache": {
            "num_hidden_layers": mc["num_hidden_layers"],
            "num_attention_heads": mc["num_attention_heads"],
            "num_key_value_heads": mc["num_attention_heads"],
            "head_dim": mc["head_dim"],
        },
        "memory_usage": memory_usage,
    }


def _memory_usage(mod: Any) -> dict[str, int]:
    """Bytes each Relax function allocates for temporaries after memory planning (static sizes only)."""
    from tvm import relax

    usage: dict[str, int] = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        total = 0

        def visit(expr: Any) -> None:
            nonlocal total
            if isinstance(expr, relax.Call) and str(getattr(expr.op, "name", "")).endswith("alloc_storage"):
                size = expr.args[0]
                if isinstance(size, relax.ShapeExpr) and all(hasattr(v, "value") for v in size.values):
                    total += int(size.values[0].value)

        relax.analysis.post_order_visit(func, visit)
        usage[gv.name_hint] = total
    return dict(sorted(usage.items()))


def gpu_rules(apple: bool) -> list[Any]:
    """dlight rules: the iPhone's (Apple GPUs, and the CUDA iPhone proxy), or TVM's CUDA defaults.

    Apple GPUs leave dlight's Matmul rule out — in apache-tvm 0.26 ``gpu.Matmul`` tries Metal
    simdgroup tensorization and crashes inside ``Tensorize`` for these kernels; GEMV/Reduction/
    Fallback rules schedule them correctly (prefill runs the matmuls with the fallback schedule).
    """
    from tvm.s_tir import dlight as dl

    tail = [dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    return tail if apple else [dl.gpu.Matmul(), *tail]


def pipeline(target: Any) -> Any:
    """TVM's default Relax pipeline, with our schedules.

    * Host CPU: every kernel gets a schedule from neox_mlc/cpu_schedule.py (GEMV, tiled matmul,
      parallel elementwise and reductions); TVM's CPU pipeline schedules nothing.
    * GPUs: :func:`gpu_rules` — the iPhone's for Metal (and for the CUDA iPhone proxy, scheduled for
      the iPhone's target), TVM's CUDA rules for CUDA without tensor-core tensorization: apache-tvm
      0.26.0's ``Tensorize`` segfaults on every float16 wmma matmul (even a plain 256x384x512 one), so
      dlight's Matmul rule takes its SIMT schedule instead (q0f16 on CUDA crashed the compiler before).
    """
    if target.kind.name == "llvm":
        from tvm.relax.backend.cpu_generic import pipeline as cpu

        from neox_mlc.cpu_schedule import host_rules

        return _scheduled_pipeline(cpu, target, host_rules())
    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as cuda

        return _scheduled_pipeline(cuda, target, gpu_rules(apple=False), [_no_tensor_core_tensorize()])
    from tvm.relax.backend.gpu_generic import pipeline as gpu

    return _scheduled_pipeline(gpu, target, gpu_rules(apple=target.kind.name == "metal"))


def _no_tensor_core_tensorize() -> Any:
    """Mark every kernel ``dlight.do_not_tensorize`` (see :func:`pipeline`)."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="NoTensorCoreTensorize")
    def mark(mod: Any, _ctx: Any) -> Any:
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc):
                mod.update_func(gv, func.with_attr("dlight.do_not_tensorize", True))
        return mod

    return mark


def _scheduled_pipeline(backend: Any, target: Any, rules: list[Any], before_schedule: Sequence[Any] = ()) -> Any:
    """A TVM backend's own pass lists, with our dlight rules after fusion."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        *before_schedule,
        dl.ApplyDefaultSchedule(*rules),
    ]
    return tvm.transform.Sequential(
        backend.library_dispatch_passes(target) + legalize + backend.dataflow_lower_passes(target) + backend.finalize_passes(target)
    )


def _bound_dynamic_shapes(mod: Any, cfg: dict[str, Any]) -> Any:
    """Give TVM's memory planner upper bounds for the symbolic sizes, as MLC does.

    With ``seq_len ≤ prefill_chunk_size`` and ``batch_size ≤ max_batch_size`` known, activations are
    planned statically (allocated once, reused every call) instead of per call.
    """
    from tvm import relax

    bounds = {
        "seq_len": cfg["prefill_chunk_size"],
        "batch_size": cfg["model_config"].get("max_batch_size", 128),
        "vocab_size": cfg["vocab_size"],
    }
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = func.with_attr("tir_var_upper_bound", bounds).with_attr("relax.memory_plan_dynamic_func_output", True)
    return mod


def _attach_metadata(mod: Any, meta: dict[str, Any]) -> Any:
    from tvm import relax

    bb = relax.BlockBuilder(mod)
    with bb.function("_metadata", params=[]):
        bb.emit_func_output(relax.StringImm(json.dumps(meta)))
    return bb.finalize()


def export_module(
    chat_config_path: str | Path, device: str, system_lib_prefix: str | None = None, host_cpu: str | None = None, cuda: CudaOptions | None = None
) -> tuple[Any, list[tuple[str, Any]], Any, dict[str, Any]]:
    """The model as a Relax IRModule (entry points, KV-cache creation, shape bounds), not yet lowered,
    with the target it is made and scheduled for (:func:`schedule_target`)."""
    from neox_mlc.gpt_neox_model import GPTNeoXForCausalLM, add_kv_cache_creation
    from neox_mlc.neox_config import NeoXConfig

    cfg = read_json(chat_config_path, "chat config")
    if cfg.get("model_type") != "gpt_neox":
        raise WorkflowError(f"model_type {cfg.get('model_type')!r} is not supported; supported: gpt_neox")
    quant = get_quantization(cfg["quantization"])
    target = schedule_target(make_target(device, host_cpu, cuda), cuda)
    host = target.kind.name == "llvm"
    from neox_mlc import cpu_gemm, cpu_gemv

    neox = NeoXConfig.from_chat_config(
        cfg, dequantize_rows=host, polynomial_erf=host, int16_dot=host and cpu_gemv.supported(target), host_matmul=host and cpu_gemm.supported(target)
    )
    model = GPTNeoXForCausalLM(neox, quant, target)
    mod, params = model.export_tvm(spec=model.get_default_spec())
    mod = add_kv_cache_creation(mod, model)
    if host:  # TVM's CPU attention kernels are scalar and single-threaded; same kernels, parallel and vectorised
        from neox_mlc.cpu_attention import replace_cpu_attention

        heads = model.cfg.num_attention_heads  # as add_kv_cache_creation made the cache: no GQA, no RoPE scaling
        mod = replace_cpu_attention(mod, heads, heads, model.cfg.head_dim, model.dtype, rope_scaling={})
    mod = _bound_dynamic_shapes(mod, cfg)
    if device in HOSTS:
        mod = mod.with_attr("system_lib_prefix", system_lib_prefix or "")
    return mod, params, target, cfg


def build(
    chat_config_path: str | Path,
    device: str,
    output: str | Path,
    system_lib_prefix: str | None = None,
    host_cpu: str | None = None,
    cuda: CudaOptions | None = None,
) -> dict[str, Any]:
    """Compile and export the library atomically; returns the metadata embedded in it."""
    import tvm

    ext = Path(output).suffix.lstrip(".")
    if device in LIB_EXT and ext != LIB_EXT[device]:
        raise WorkflowError(f"output {output} for device {device} must end in .{LIB_EXT[device]}")
    export: dict[str, Any] = {}
    if device == "cuda":
        require_nvcc()
        cuda = cuda or CudaOptions()
    mod, params, scheduled_for, cfg = export_module(chat_config_path, device, system_lib_prefix, host_cpu, cuda)
    target = make_target(device, host_cpu, cuda)
    if device == "cuda":
        export["fpack_imports"] = fatbin_pack_imports(cuda.archs, target)
    with scheduled_for:
        lowered = pipeline(scheduled_for)(mod)
    meta = metadata(cfg, params, _memory_usage(lowered))
    lowered = _attach_metadata(lowered, meta)
    executable = tvm.compile(lowered, target=target, relax_pipeline=None)
    with atomic_path(output) as tmp:
        staged = tmp.with_suffix("." + ext)
        executable.export_library(str(staged), **export)
        if ext == "tar":
            _normalize_tar(staged, tmp)
            staged.unlink()
        else:
            staged.rename(tmp)
    return meta


def _normalize_tar(src: Path, dst: Path) -> None:
    """Rewrite an archive with sorted members, zero mtimes and root ownership.

    Why: TVM stamps the build time into the archive, so two builds of the same library would differ;
    with this the bundle's sha256s (MANIFEST.json) are reproducible across machines and reruns.
    """
    import io
    import tarfile

    with tarfile.open(src) as tin:
        members = sorted((m for m in tin.getmembers() if m.isfile()), key=lambda m: m.name)
        blobs = [(m.name, tin.extractfile(m).read()) for m in members]
    with tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        for name, data in blobs:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            info.uname = info.gname = "root"
            tout.addfile(info, io.BytesIO(data))


def mlc_llm_argv(chat_config: str, device: str, output: str, system_lib_prefix: str | None = None) -> list[str]:
    """The real MLC-LLM CLI call, for users who have it (``backend: mlc_llm``)."""
    argv = ["mlc_llm", "compile", str(chat_config), "--device", "cpu" if device == "llvm" else device, "-o", str(output)]
    if system_lib_prefix:
        argv += ["--system-lib-prefix", system_lib_prefix]
    return argv


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="path to mlc-chat-config.json")
    ap.add_argument("--device", required=True, help=f"one of {', '.join(TARGETS)}")
    ap.add_argument("-o", "--output", required=True, help="library file to write")
    ap.add_argument("--system-lib-prefix", help="symbol prefix for static (iphone/metal) libraries")
    ap.add_argument("--host-cpu", default="auto", help="LLVM CPU of the host (llvm/cpu) library, e.g. x86-64-v3; auto: this machine's x86-64 level")
    ap.add_argument("--cuda-arch", help=f"cuda: SASS archs for the kernels' fatbin, comma-separated (default: {','.join(DEFAULT_ARCHS)})")
    ap.add_argument("--iphone-proxy", action="store_true", help="cuda: schedule every kernel exactly as for the iphone target (its dlight rules and GPU limits)")
    ap.add_argument("--backend", choices=["native", "mlc_llm"], default="native")
    return ap.parse_args(argv)


def cuda_options(device: str, cuda_arch: str | None, iphone_proxy: bool) -> CudaOptions | None:
    """The CLI's CUDA options, refused for other devices (they would be silently ignored)."""
    if device != "cuda":
        if cuda_arch or iphone_proxy:
            raise WorkflowError(f"--cuda-arch/--iphone-proxy apply to device cuda only, not {device!r}")
        return None
    return CudaOptions(cuda_arch or DEFAULT_ARCHS, iphone_proxy)


def host_cpu_option(host_cpu: str) -> str | None:
    """``--host-cpu``: None for ``auto`` (:func:`default_host_cpu`), else a CPU name LLVM knows, checked before any work."""
    if host_cpu == "auto":
        return None
    from tvm.target import codegen

    if not codegen.llvm_is_valid_cpu(host_cpu, "x86_64-unknown-linux-gnu") and not codegen.llvm_is_valid_cpu(host_cpu, "aarch64-unknown-linux-gnu"):
        raise WorkflowError(f"host_cpu {host_cpu!r} is not a CPU LLVM knows; allowed: auto or an LLVM -mcpu name such as x86-64-v3, x86-64-v4, znver4")
    return host_cpu


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    check_output(a.output, None, [a.model])
    host_cpu = host_cpu_option(a.host_cpu)
    cuda = cuda_options(a.device, a.cuda_arch, a.iphone_proxy)
    if a.backend == "mlc_llm":
        if a.iphone_proxy:
            raise WorkflowError("--iphone-proxy is this project's build; backend mlc_llm has no such option")
        run_mlc_llm(mlc_llm_argv(a.model, a.device, a.output, a.system_lib_prefix))
        return 0
    build(a.model, a.device, a.output, a.system_lib_prefix, host_cpu, cuda)
    return 0


if __name__ == "__main__":
    run_cli(main)
