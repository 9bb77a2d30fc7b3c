"""``gpu_check``: run the CUDA and iPhone-proxy libraries on a GPU, against MLC's logits and for speed.

Two steps, because the GPU machine has no TVM compiler (and no network):

* ``prepare DIR`` (build machine: apache-tvm + nvcc, no GPU): compiles the reference fixtures'
  q0f16 and q4f16_1 as the CUDA library and the iPhone-proxy library (``compile --iphone-proxy``),
  and the speed shapes (162.5M: hidden 768, 12 layers, vocab 50432; the real LINE 3.6B: hidden
  3072, 30 layers, 32 heads, inter 12288, vocab 51200) for q0f16/q4f16_0/q4f16_1; copies the fixtures'
  tensor caches and MLC's logits; writes ``manifest.json``. No weights of the speed shapes travel.
* ``run DIR`` (GPU machine; works with a runtime-only TVM, ``TVM_USE_RUNTIME_LIB=1``): per fixture
  library, prefill MLC's 8 input tokens and decode its 8 greedy tokens, comparing logits (max abs
  ≤ 5e-3) and tokens; per speed library, random parameters made on the device from the library's
  ``_metadata``, prefill 128 tokens and decode 64 (tokens/s), beside transformers float16 eager on
  the same device and the memory-bandwidth bound (weight bytes read per decode step ÷ bandwidth).
  Writes one JSON report.

``--device llvm`` (prepare) / ``cpu`` (run) is the same check on the host, with llvm libraries in
the CUDA library's place: CI runs it so the check's logic is tested without a GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neox_mlc.common import REPO_ROOT, WorkflowError, atomic_path, read_json, run_cli, write_json

TOL = 5e-3  # max |logit difference| against MLC's own library (fixtures README)
FIXTURE_QUANTS = ("q0f16", "q4f16_1")  # the modes MLC's reference holds logits for
SPEED_QUANTS = ("q0f16", "q4f16_0", "q4f16_1")
H200_BANDWIDTH_TBS = 4.8
# GPT-NeoX shapes timed: the 162.5M synthetic model of ../shared/ANCHORS.md and the real LINE 3.6B.
SHAPES: dict[str, dict[str, Any]] = {
    "162m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 50432,
             "rotary_pct": 0.25, "use_parallel_residual": True},
    "3.6b": {"hidden_size": 3072, "num_hidden_layers": 30, "num_attention_heads": 32, "intermediate_size": 12288, "vocab_size": 51200,
             "rotary_pct": 1.0, "use_parallel_residual": False},
}
TINY_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256, "vocab_size": 1024,
              "rotary_pct": 0.25, "use_parallel_residual": True}  # CI's stand-in for the speed shapes
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "mlc-reference"
LIB_ROLES = {"cuda": ("cuda", "iphone_proxy"), "llvm": ("llvm",)}  # prepare device -> libraries per model


# ---------------------------------------------------------------- prepare (build machine)


def hf_config(shape: dict[str, Any]) -> dict[str, Any]:
    """A GPT-NeoX config.json for a shape (what transformers and gen_config read)."""
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "max_position_embeddings": 2048,
        "rotary_emb_base": 10000, "layer_norm_eps": 1e-5, "hidden_act": "gelu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16", **shape,
    }


def _compile(cfg: Path, device: str, out: Path, archs: Sequence[str]) -> None:
    from neox_mlc.compile import CudaOptions, build

    if device == "llvm":
        build(cfg, "llvm", out)
    else:
        build(cfg, "cuda", out, cuda=CudaOptions(tuple(archs), iphone_proxy=out.stem.endswith("iphone_proxy")))


def prepare(out: Path, device: str, archs: Sequence[str], shapes: dict[str, dict[str, Any]], quants: Sequence[str], context: int = 1024) -> dict[str, Any]:
    """Build everything ``run`` needs into ``out`` (atomically) and return its manifest."""
    from neox_mlc.gen_config import load_templates, make_chat_config

    if device not in LIB_ROLES:
        raise WorkflowError(f"prepare device {device!r} is not supported; allowed: {', '.join(LIB_ROLES)}")
    if device == "cuda":
        from neox_mlc.cuda_kernels import parse_archs, require_nvcc

        require_nvcc()
        archs = parse_archs(archs)
    manifest: dict[str, Any] = {"device": device, "archs": list(archs) if device == "cuda" else [], "fixtures": {}, "shapes": {}}
    with atomic_path(out, "gpu_check prepare") as tmp:
        tmp.mkdir(parents=True)
        shutil.copy2(FIXTURES / "inputs.json", tmp / "inputs.json")
        for quant in FIXTURE_QUANTS:
            d = tmp / "fixtures" / quant
            shutil.copytree(FIXTURES / quant, d)
            libs = {}
            for role in LIB_ROLES[device]:
                _compile(d / "mlc-chat-config.json", device, tmp / "libs" / f"fixture-{quant}-{role}.so", archs)
                libs[role] = f"libs/fixture-{quant}-{role}.so"
            manifest["fixtures"][quant] = {"dir": f"fixtures/{quant}", "libs": libs}
        for name, shape in shapes.items():
            model = tmp / "shapes" / name
            model.mkdir(parents=True)
            (model / "config.json").write_text(json.dumps(hf_config(shape), indent=2))
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy2(FIXTURES / "model" / f, model / f)
            entry: dict[str, Any] = {"config": f"shapes/{name}/config.json", "quants": {}}
            for quant in quants:
                cfg_path = model / f"{quant}-mlc-chat-config.json"
                cfg_path.write_text(json.dumps(make_chat_config(model, quant, "line_llm", load_templates()["line_llm"], context), indent=2))
                lib = f"libs/{name}-{quant}-{LIB_ROLES[device][0]}.so"
                _compile(cfg_path, device, tmp / lib, archs)
                entry["quants"][quant] = {"chat_config": str(cfg_path.relative_to(tmp)), "lib": lib}
            manifest["shapes"][name] = entry
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---------------------------------------------------------------- run (GPU machine, runtime-only TVM)


def load_cuda_runtime() -> None:
    """Make TVM able to run CUDA libraries: its CUDA runtime (``libtvm_runtime_cuda.so``) is not
    loaded by ``import tvm``; it needs ``libcudart.so.13``, which torch's ``nvidia`` packages carry."""
    import tvm

    lib_dir = Path(tvm.__file__).parent / "lib"
    patterns = [os.path.join(base, sub, "libcudart.so.13") for base in sys.path for sub in ("nvidia/cu13/lib", "nvidia/cuda_runtime/lib")]
    hits = [h for p in [*patterns, "/usr/local/cuda/lib64/libcudart.so.13"] for h in glob.glob(p)]
    if hits:  # else the system's library path must have it
        ctypes.CDLL(hits[0], mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(lib_dir / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)
    if not tvm.cuda(0).exist:
        raise WorkflowError("TVM's CUDA runtime loaded but sees no GPU (is the driver's libcuda.so.1 there?)")


def random_params(params: list[dict[str, Any]], dev: Any, seed: int = 0) -> dict[str, Any]:
    """Random weights of the library's parameter list, made where they run (torch on a GPU).

    Floats ~ N(0, 0.02²); packed 4-bit words are random bits (every code is a valid weight).
    """
    import tvm

    out: dict[str, Any] = {}
    if str(dev).startswith("cuda"):
        import torch

        gen = torch.Generator(device="cuda").manual_seed(seed)
        for p in params:
            shape = [int(d) for d in p["shape"]]
            if p["dtype"] in ("float16", "float32", "bfloat16"):
                t = torch.randn(shape, dtype=getattr(torch, p["dtype"]), device="cuda", generator=gen) * 0.02
                out[p["name"]] = tvm.runtime.from_dlpack(t)
            else:
                t = torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device="cuda", generator=gen)
                out[p["name"]] = tvm.runtime.from_dlpack(t)._create_view(tuple(shape), p["dtype"])
        torch.cuda.synchronize()
        return out
    rng = np.random.default_rng(seed)
    for p in params:
        shape = [int(d) for d in p["shape"]]
        if p["dtype"].startswith("float"):
            arr = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(p["dtype"])
        else:
            arr = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(p["dtype"])
        out[p["name"]] = tvm.runtime.tensor(arr, dev)
    return out


def weight_bytes_per_decode_step(params: list[dict[str, Any]]) -> int:
    """Bytes of weights one decode step reads: every parameter but the input embedding (one row)."""
    total = 0
    for p in params:
        if p["name"].startswith("gpt_neox.embed_in."):
            continue
        total += int(np.prod([int(d) for d in p["shape"]])) * np.dtype(p["dtype"]).itemsize
    return total


def conformance(lib: Path, fixture: Path, inputs: list[int], device: str) -> dict[str, Any]:
    """Prefill MLC's inputs, decode its greedy tokens; logits and tokens against MLC's own run."""
    from neox_mlc.runtime import ModelRuntime

    quant = fixture.name
    greedy = json.loads((fixture / f"greedy_{quant}.json").read_text())
    ref_prefill = np.load(fixture / f"prefill_logits_{quant}.npy").reshape(-1)
    ref_decode = np.load(fixture / f"decode_logits_{quant}.npy")
    rt = ModelRuntime(lib, fixture, fixture / "mlc-chat-config.json", device)
    logits = rt.prefill(inputs)
    prefill_err = float(np.abs(logits - ref_prefill).max())
    tokens, decode_err = [], 0.0
    for i in range(len(ref_decode)):
        tokens.append(int(logits.argmax()))
        logits = rt.decode(greedy["greedy_tokens"][i])  # feed MLC's token, so one slip cannot cascade
        decode_err = max(decode_err, float(np.abs(logits - ref_decode[i]).max()))
    tokens.append(int(logits.argmax()))
    want = [*greedy["greedy_tokens"], greedy["next_token_after_greedy"]]
    ok = prefill_err <= TOL and decode_err <= TOL and tokens == want
    return {"prefill_max_abs": prefill_err, "decode_max_abs": decode_err, "greedy_identical": tokens == want, "tokens": tokens, "pass": ok}


def library_speed(lib: Path, chat_config: Path, device: str, prompt: int, decode: int, bandwidth_tbs: float | None) -> dict[str, Any]:
    """Prefill/decode tokens/s of one library with random parameters, and its bandwidth bound."""
    from neox_mlc.evaluate import speed
    from neox_mlc.runtime import ModelRuntime

    rt = ModelRuntime(lib, None, chat_config, device, make_params=random_params)
    res: dict[str, Any] = speed(rt, prompt, decode)
    res["weight_bytes_per_decode_step"] = weight_bytes_per_decode_step(rt.metadata["params"])
    if bandwidth_tbs:
        bound = bandwidth_tbs * 1e12 / res["weight_bytes_per_decode_step"]
        res["bandwidth_bound_decode_tok_s"] = bound
        res["decode_fraction_of_bound"] = res["decode_tok_s"] / bound
    del rt
    return res


def transformers_speed(config: Path, device: str, prompt: int, decode: int) -> dict[str, Any]:
    """transformers eager (float16 on a GPU, float32 on the host) on the same shape, random weights."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cuda = device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    cfg = GPTNeoXConfig(**{k: v for k, v in json.loads(config.read_text()).items() if k not in ("architectures", "torch_dtype")})
    with torch.device("cuda" if cuda else "cpu"):  # weights initialised where they run
        model = GPTNeoXForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="eager").eval()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ids = torch.tensor([[5 + (i * 7) % 200 for i in range(prompt)]], device=model.device)
    with torch.inference_mode():
        model(ids[:, :8])
        sync()
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        sync()
        t1 = time.perf_counter()
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(decode):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        t2 = time.perf_counter()
    del model, past, out
    if cuda:
        torch.cuda.empty_cache()
    return {"dtype": str(dtype).removeprefix("torch."), "prefill_tok_s": prompt / (t1 - t0), "decode_tok_s": decode / (t2 - t1)}


def run(root: Path, device: str, prompt: int, decode: int, bandwidth_tbs: float | None, with_torch: bool = True, shapes: Sequence[str] | None = None) -> dict[str, Any]:
    """The report: conformance per fixture library, speed per shape, and the goals."""
    manifest = read_json(root / "manifest.json", "gpu check manifest")
    if device not in ("cuda", "cpu"):
        raise WorkflowError(f"run device {device!r} is not supported; allowed: cuda, cpu")
    if (device == "cuda") != (manifest["device"] == "cuda"):
        raise WorkflowError(f"{root} was prepared for {manifest['device']}; run it with --device {'cuda' if manifest['device'] == 'cuda' else 'cpu'}")
    if device == "cuda":
        load_cuda_runtime()
        os.environ.setdefault("NEOX_MLC_ADAPTIVE_THREADS", "0")  # the host thread probe is for CPU kernels
    import tvm

    report: dict[str, Any] = {"device": device, "tvm_runtime_only": bool(tvm.base._RUNTIME_ONLY), "archs": manifest["archs"], "conformance": {}, "speed": {}}
    if device == "cuda":
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    inputs = json.loads((root / "inputs.json").read_text())
    inputs = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    for quant, fx in manifest["fixtures"].items():
        for role, lib in fx["libs"].items():
            report["conformance"][f"{quant}/{role}"] = conformance(root / lib, root / fx["dir"], inputs, device)
    for name, entry in manifest["shapes"].items():
        if shapes and name not in shapes:
            continue
        res: dict[str, Any] = {}
        for quant, q in entry["quants"].items():
            res[quant] = library_speed(root / q["lib"], root / q["chat_config"], device, prompt, decode, bandwidth_tbs)
        if with_torch:
            res["transformers"] = transformers_speed(root / entry["config"], device, prompt, decode)
            res["decode_vs_transformers"] = {q: res[q]["decode_tok_s"] / res["transformers"]["decode_tok_s"] for q in entry["quants"]}
        report["speed"][name] = res
    report["goals"] = {
        "logits_within_5e-3_and_greedy_identical": all(c["pass"] for c in report["conformance"].values()),
    }
    real = report["speed"].get("3.6b", {})
    if "decode_vs_transformers" in real:
        report["goals"]["decode_3.6b_at_least_2x_transformers"] = {q: r >= 2.0 for q, r in real["decode_vs_transformers"].items()}
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="build the libraries and copy the fixtures (build machine)")
    p.add_argument("out", help="folder to write (replaced)")
    p.add_argument("--device", default="cuda", help="cuda (default) or llvm (CI's host stand-in)")
    p.add_argument("--cuda-arch", default="sm_90", help="SASS archs, comma-separated (default sm_90: H100/H200)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"speed shapes, comma-separated, of {', '.join(SHAPES)}, or 'tiny' or 'none'")
    p.add_argument("--quants", default=",".join(SPEED_QUANTS), help="quantizations of the speed libraries")
    r = sub.add_parser("run", help="run the check (GPU machine; runtime-only TVM works)")
    r.add_argument("dir", help="folder written by prepare")
    r.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    r.add_argument("--prompt", type=int, default=128)
    r.add_argument("--decode", type=int, default=64)
    r.add_argument("--bandwidth-tbs", type=float, default=H200_BANDWIDTH_TBS, help="GPU memory bandwidth in TB/s for the bound (H200: 4.8)")
    r.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
    r.add_argument("-o", "--output", required=True, help="report JSON to write")
    return ap.parse_args(argv)


def _shapes(spec: str) -> dict[str, dict[str, Any]]:
    names = [s for s in spec.split(",") if s and s != "none"]
    known = {**SHAPES, "tiny": TINY_SHAPE}
    bad = [n for n in names if n not in known]
    if bad:
        raise WorkflowError(f"shape {bad[0]!r} is not known; allowed: {', '.join(known)}, none")
    return {n: known[n] for n in names}


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.step == "prepare":
        from neox_mlc.quantization import get_quantization

        quants = [q for q in a.quants.split(",") if q]
        for q in quants:
            get_quantization(q)
        manifest = prepare(Path(a.out), a.device, a.cuda_arch.split(","), _shapes(a.shapes), quants)
        print(json.dumps(manifest, indent=2))
        return 0
    report = run(Path(a.dir), a.device, a.prompt, a.decode, a.bandwidth_tbs, with_torch=not a.no_torch)
    write_json(a.output, report)
    print(json.dumps(report, indent=2))
    return 0 if report["goals"]["logits_within_5e-3_and_greedy_identical"] else 1


if __name__ == "__main__":
    run_cli(main)
