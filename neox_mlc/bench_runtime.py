"""Benchmark compile time and host-CPU inference of the compiled library beside torch eager; writes JSON.

Measured in one run, each in its own process (peak RSS is the process's own VmHWM):

* compile time per target (llvm, iphone) for the model's chat config;
* prefill (``--prompt`` tokens) and greedy decode (``--decode`` steps) tokens/s of the compiled
  library, for each of ``QUANTS``, on a synthetic GPT-NeoX (default: hidden 768, 12 layers, 12 heads,
  vocab 50432 — 162.5 M parameters, the size ../shared/ANCHORS.md uses) and on the tiny model;
* transformers + torch eager (float32 and bfloat16) on the same checkpoint, same prompt and steps,
  with its KV cache;
* llama.cpp itself (F16, Q8_0, Q4_0 GGUF written from the same checkpoint, neox_mlc/llamacpp.py)
  when the optional ``llama-cpp-python`` interpreter is installed (``LLAMA_PYTHON``);
* with ``--load N``: decode under N busy-looping processes — this library with 1 thread, with all
  threads as TVM's pool runs them by default (pinned, long spin), with the runtime's adaptive
  thread count, and llama.cpp Q4_0 — the "no collapse under contention" figure.

Speeds are ``--rounds`` runs per engine, alternating between engines, reported as medians. In each
round every mode of this library runs right beside its llama.cpp peer (``PEERS``), and every other
round in reverse order (``round_order``), so the ratio of a pair's two runs compares the engines on
the same host state: this host's memory speed moves by up to a third within a minute (162.5 M q0f16,
64-step runs a minute apart: 125 and 168 tok/s), more than the engines differ. Targets (issues #4,
#15): decode faster than torch eager (medians); against llama.cpp, on the median of the per-round
ratios: decode ≥ 1 (q4 modes vs Q4_0, q0f16 vs F16), prefill ≥ 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neox_mlc.benchtools import LoadGenerator, make_checkpoint, median_run, run_child, write_result

QUANTS = ("q0f16", "q4f16_0", "q4f16_1")  # config.yaml's pair, and MLC's default 4-bit layout
PEERS = {"mlc_q0f16": "llama_cpp_F16", "mlc_q4f16_0": "llama_cpp_Q4_0", "mlc_q4f16_1": "llama_cpp_Q4_0"}  # issue #15's pairs


def round_order(engines: Sequence[str], round_no: int) -> list[str]:
    """The engines in round ``round_no``'s order: each of ``PEERS``' modes followed by its peer (when
    measured), the rest as given; odd rounds reversed, so that neither of a pair always runs first."""
    order: list[str] = []
    for key in engines:
        for k in (key, PEERS.get(key)):
            if k in engines and k not in order:
                order.append(k)
    return order if round_no % 2 == 0 else order[::-1]


def paired_ratios(runs: dict[str, list[dict[str, Any]]], key: str, peer: str, what: str) -> dict[str, Any]:
    """``what`` of ``key`` over ``peer``'s in each round, and the median of those ratios."""
    ratios = [a[what] / b[what] for a, b in zip(runs[key], runs[peer], strict=True)]
    return {"per_round": [round(r, 4) for r in ratios], "median": round(statistics.median(ratios), 4)}


def prepare(model: Path, work: Path, quant: str, context: int) -> Path:
    """Convert + chat config for one quantization; returns the quant directory."""
    from neox_mlc.convert_weight import convert
    from neox_mlc.gen_config import load_templates, make_chat_config

    d = work / quant
    if not (d / "params" / "tensor-cache.json").is_file():
        convert(model, quant, d / "params")
    cfg = make_chat_config(model, quant, "line_llm", load_templates()["line_llm"], context)
    (d / "mlc-chat-config.json").write_text(json.dumps(cfg, indent=2))
    return d


def compile_child(cfg: Path, device: str, out: Path) -> dict[str, Any]:
    return run_child(f"from neox_mlc.compile import build\nbuild({str(cfg)!r}, {device!r}, {str(out)!r}, 'bench_')")


# TVM's own thread-pool behaviour, which the runtime changes by default (neox_mlc/runtime.py)
TVM_DEFAULT_POOL = {"TVM_BIND_THREADS": "1", "TVM_THREAD_POOL_SPIN_COUNT": "300000", "NEOX_MLC_ADAPTIVE_THREADS": "0"}
FIXED_THREADS = {"NEOX_MLC_ADAPTIVE_THREADS": "0"}
LLAMA_TYPES = ("F16", "Q8_0", "Q4_0")


def mlc_speed_child(lib: Path, params: Path, cfg: Path, prompt: int, decode: int, threads: int, env: dict[str, str] | None = None,
                    timeout: float | None = None) -> dict[str, Any]:
    return run_child(
        "import json\nfrom neox_mlc.runtime import ModelRuntime\nfrom neox_mlc.evaluate import speed\n"
        f"rt = ModelRuntime({str(lib)!r}, {str(params)!r}, {str(cfg)!r})\n"
        f"print(json.dumps(speed(rt, {prompt}, {decode})))",
        env={"TVM_NUM_THREADS": str(threads), **(env or {})},
        timeout=timeout,
    )


def profile_child(lib: Path, params: Path, cfg: Path, prompt: int, steps: int = 16) -> dict[str, Any]:
    """Per-kernel CPU time of one decode step on one thread (runtime.kernel_profile): where decode time goes."""
    return run_child(
        "import json\nfrom neox_mlc.runtime import ModelRuntime, kernel_profile\n"
        f"rt = ModelRuntime({str(lib)!r}, {str(params)!r}, {str(cfg)!r})\n"
        f"print(json.dumps(kernel_profile(rt, {steps}, {prompt})))",
        env={"TVM_NUM_THREADS": "1", **FIXED_THREADS},
    )


def llama_speed_child(python: str, gguf: Path, prompt: int, decode: int, threads: int) -> dict[str, Any]:
    return run_child(f"import json\nfrom neox_mlc.llamacpp import speed\nprint(json.dumps(speed({str(gguf)!r}, {prompt}, {decode}, {threads})))", python)


def prepare_llama(python: str, model: Path, work: Path) -> dict[str, Any]:
    """F16 GGUF from the checkpoint (this project's writer), Q8_0 and Q4_0 by llama.cpp's quantizer."""
    import time

    from neox_mlc.llamacpp import write_gguf

    work.mkdir(parents=True, exist_ok=True)
    files, times = {"F16": work / "model-F16.gguf"}, {}
    if not files["F16"].is_file():
        t = time.perf_counter()
        write_gguf(model, files["F16"])
        times["convert_F16_s"] = round(time.perf_counter() - t, 3)
    for ftype in LLAMA_TYPES[1:]:
        files[ftype] = work / f"model-{ftype}.gguf"
        if not files[ftype].is_file():
            res = run_child(f"from neox_mlc.llamacpp import quantize\nquantize({str(files['F16'])!r}, {str(files[ftype])!r}, {ftype!r})", python)
            times[f"quantize_{ftype}_s"] = res["wall_s"]
    return {"files": files, "times": times}


def torch_speed_child(model: Path, dtype: str, prompt: int, decode: int, threads: int) -> dict[str, Any]:
    return run_child(
        "import json, time, torch\nfrom transformers import GPTNeoXForCausalLM\n"
        f"torch.set_num_threads({threads})\n"
        f"m = GPTNeoXForCausalLM.from_pretrained({str(model)!r}, dtype=torch.{dtype}).eval()\n"
        f"ids = torch.tensor([[5 + (i * 7) % 200 for i in range({prompt})]])\n"
        "with torch.inference_mode():\n"
        "    m(ids[:, :8])\n"
        "    t0 = time.perf_counter(); out = m(ids, use_cache=True); t1 = time.perf_counter()\n"
        "    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)\n"
        f"    for _ in range({decode}):\n"
        "        out = m(tok, past_key_values=past, use_cache=True); past = out.past_key_values; tok = out.logits[:, -1:].argmax(-1)\n"
        "    t2 = time.perf_counter()\n"
        f"print(json.dumps({{'prefill_tok_s': {prompt} / (t1 - t0), 'decode_tok_s': {decode} / (t2 - t1)}}))"
    )


def bench_model(name: str, model: Path, work: Path, prompt: int, decode: int, threads: int, context: int, rounds: int = 1,
                torch_too: bool = True, llama: str | None = None, compile_iphone: bool = True, reuse_libs: bool = False,
                profile: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"model": name}
    engines: dict[str, Any] = {}  # engine → zero-argument child that measures it once
    for quant in QUANTS:
        d = prepare(model, work, quant, context)
        res: dict[str, Any] = {}
        for device, ext in (("llvm", "so"), ("iphone", "tar")) if compile_iphone else (("llvm", "so"),):
            if not (reuse_libs and (d / f"lib-{device}.{ext}").is_file()):
                res[f"compile_{device}"] = compile_child(d / "mlc-chat-config.json", device, d / f"lib-{device}.{ext}")
        out[f"mlc_{quant}"] = res
        engines[f"mlc_{quant}"] = lambda d=d: mlc_speed_child(d / "lib-llvm.so", d / "params", d / "mlc-chat-config.json", prompt, decode, threads)
    if torch_too:
        for dtype in ("float32", "bfloat16"):
            engines[f"torch_eager_{dtype}"] = lambda dtype=dtype: torch_speed_child(model, dtype, prompt, decode, threads)
    if llama:
        prep = prepare_llama(llama, model, work / "llama.cpp")
        out["llama_cpp_prepare"] = prep["times"]
        for ftype, gguf in prep["files"].items():
            out[f"llama_cpp_{ftype}"] = {"file_gib": round(gguf.stat().st_size / (1 << 30), 3)}
            engines[f"llama_cpp_{ftype}"] = lambda gguf=gguf: llama_speed_child(llama, gguf, prompt, decode, threads)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in engines}
    for i in range(rounds):  # alternate engines within each round: a load that comes and goes hits all alike
        for key in round_order(list(engines), i):
            runs[key].append(engines[key]())
    for key, r in runs.items():
        if key.startswith("mlc_"):
            out[key]["run_host_cpu"] = median_run(r)
            if PEERS[key] in runs:
                out[key]["vs_" + PEERS[key]] = {w: paired_ratios(runs, key, PEERS[key], f"{w}_tok_s") for w in ("decode", "prefill")}
        else:
            out[key] = {**out.get(key, {}), **median_run(r)}
    if profile:
        for quant in QUANTS:
            d = work / quant
            out[f"mlc_{quant}"]["decode_profile_1_thread"] = profile_child(d / "lib-llvm.so", d / "params", d / "mlc-chat-config.json", prompt)
    out["targets"] = _targets(out, llama is not None, torch_too)
    return out


def _targets(out: dict[str, Any], llama: bool, torch_too: bool) -> dict[str, bool]:
    def mlc(q: str, what: str) -> float:
        return out[f"mlc_{q}"]["run_host_cpu"][what]

    targets: dict[str, bool] = {}
    if torch_too:
        best_torch = max(out[f"torch_eager_{d}"]["decode_tok_s"] for d in ("float32", "bfloat16"))
        targets.update({f"decode_{q}_faster_than_torch_eager": mlc(q, "decode_tok_s") > best_torch for q in QUANTS})
    if llama:
        for q in QUANTS:
            paired = out[f"mlc_{q}"]["vs_" + PEERS[f"mlc_{q}"]]
            targets[f"decode_{q}_at_least_llama_cpp"] = paired["decode"]["median"] >= 1.0
            targets[f"prefill_{q}_at_least_half_llama_cpp"] = paired["prefill"]["median"] >= 0.5
    return targets


DEFAULT_POOL_TIMEOUT_S = 180.0


def _bounded(measure: Any, decode: int, timeout: float = DEFAULT_POOL_TIMEOUT_S) -> dict[str, Any]:
    """One run given ``timeout`` seconds; a run that needs longer is recorded as such, with the bound it implies."""
    import subprocess

    try:
        return measure(timeout)
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": timeout, "decode_tok_s_at_most": round(decode / timeout, 4)}


def contention(work: Path, load: int, prompt: int, decode: int, threads: int, rounds: int, llama: str | None) -> dict[str, Any]:
    """Decode under ``load`` busy processes: 1 thread, TVM's default pool, the adaptive runtime, llama.cpp."""
    d = work / "q4f16_0"
    lib = (d / "lib-llvm.so", d / "params", d / "mlc-chat-config.json")
    engines = {
        "mlc_q4f16_0_1_thread": lambda: mlc_speed_child(*lib, prompt, decode, 1, FIXED_THREADS),
        f"mlc_q4f16_0_{threads}_threads_tvm_default_pool": lambda: _bounded(lambda t: mlc_speed_child(*lib, prompt, decode, threads, TVM_DEFAULT_POOL, t), decode),
        f"mlc_q4f16_0_{threads}_threads_adaptive": lambda: mlc_speed_child(*lib, prompt, decode, threads),
    }
    if llama:
        engines[f"llama_cpp_Q4_0_{threads}_threads"] = lambda: llama_speed_child(llama, work / "llama.cpp" / "model-Q4_0.gguf", prompt, decode, threads)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in engines}
    with LoadGenerator(load):
        for _ in range(rounds):
            for key, measure in engines.items():
                runs[key].append(measure())
    return {"load_processes": load, **{k: median_run(r) for k, r in runs.items()}}


def cpu_name() -> str:
    """``lscpu``'s model name and the SIMD extensions that matter here (README tables name the CPU)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16") if f in flags]
    return f"{model} ({', '.join(simd)})"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="benchmarks/runtime-work")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50432)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny-model", default="resources/models/tiny-neox-ja", help="also benchmarked; its tokenizer is reused for the synthetic model (build it first)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per engine, alternating; medians reported")
    ap.add_argument("--load", type=int, default=0, help="also measure decode under this many busy processes (32-token prompt, 16 steps)")
    ap.add_argument("--load-rounds", type=int, default=1, help="runs per engine under load")
    ap.add_argument("--no-torch", action="store_true", help="skip transformers + torch eager")
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny model")
    ap.add_argument("--no-iphone", action="store_true", help="skip the iphone compile-time rows")
    ap.add_argument("--reuse-libs", action="store_true", help="keep libraries already built in --work (no compile rows)")
    ap.add_argument("--profile", action="store_true", help="also time each kernel of a decode step (1 thread, CPU time)")
    ap.add_argument("-o", "--output", default="benchmarks/runtime.json")
    a = ap.parse_args(argv)
    from neox_mlc.llamacpp import llama_python

    llama = llama_python()
    work = Path(a.work)
    synth = work / "synthetic-model"
    if not (synth / "config.json").is_file():
        make_checkpoint(synth, a.hidden, a.layers, a.vocab, shards=1, heads=a.heads)
    tok_src = Path(a.tiny_model) if Path(a.tiny_model).is_dir() else None
    if tok_src is None:
        raise SystemExit(f"need a tokenizer: build the tiny model first ({a.tiny_model})")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tok_src / f, synth / f)
    opts = {"rounds": a.rounds, "torch_too": not a.no_torch, "llama": llama, "compile_iphone": not a.no_iphone, "reuse_libs": a.reuse_libs, "profile": a.profile}
    results: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": a.threads,
        "prompt_tokens": a.prompt,
        "decode_tokens": a.decode,
        "rounds": a.rounds,
        "llama_cpp": llama is not None,
        "synthetic": bench_model(f"synthetic GPT-NeoX h{a.hidden} L{a.layers} V{a.vocab}", synth, work / "synthetic", a.prompt, a.decode, a.threads, 1024, **opts),
    }
    if a.load:
        # a short workload: under load TVM's default pool falls below 1 tok/s (minutes per 64-token run)
        results["contention"] = contention(work / "synthetic", a.load, min(a.prompt, 32), min(a.decode, 16), a.threads, a.load_rounds, llama)
    if not a.no_tiny:
        results["tiny"] = bench_model("tiny", tok_src, work / "tiny", min(a.prompt, 128), a.decode, a.threads, 256, **opts)
    write_result(a.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
