"""Benchmark compile time and host-CPU inference of the compiled library beside torch eager; writes JSON.

Measured in one run, each in its own process (peak RSS is the process's own VmHWM):

* compile time per target (llvm, iphone) for the model's chat config;
* prefill (``--prompt`` tokens) and greedy decode (``--decode`` steps) tokens/s of the compiled
  library, for each of ``QUANTS``, on a synthetic GPT-NeoX (default: hidden 768, 12 layers, 12 heads,
  vocab 50432 — 162.5 M parameters, the size ../shared/ANCHORS.md uses) and on the tiny model;
* transformers + torch eager (float32 and bfloat16) on the same checkpoint, same prompt and steps,
  with its KV cache.

Target (issue #4): decode faster than torch eager on the same CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from neox_mlc.benchtools import make_checkpoint, run_child, write_result

QUANTS = ("q0f16", "q4f16_0", "q4f16_1")  # config.yaml's pair, and MLC's default 4-bit layout


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


def mlc_speed_child(lib: Path, params: Path, cfg: Path, prompt: int, decode: int, threads: int) -> dict[str, Any]:
    return run_child(
        f"import os, json\nos.environ['TVM_NUM_THREADS'] = '{threads}'\n"
        "from neox_mlc.runtime import ModelRuntime\nfrom neox_mlc.evaluate import speed\n"
        f"rt = ModelRuntime({str(lib)!r}, {str(params)!r}, {str(cfg)!r})\n"
        f"print(json.dumps(speed(rt, {prompt}, {decode})))"
    )


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


def bench_model(name: str, model: Path, work: Path, prompt: int, decode: int, threads: int, context: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for quant in QUANTS:
        d = prepare(model, work, quant, context)
        res: dict[str, Any] = {}
        for device, ext in (("llvm", "so"), ("iphone", "tar")):
            res[f"compile_{device}"] = compile_child(d / "mlc-chat-config.json", device, d / f"lib-{device}.{ext}")
        res["run_host_cpu"] = mlc_speed_child(d / "lib-llvm.so", d / "params", d / "mlc-chat-config.json", prompt, decode, threads)
        out[f"mlc_{quant}"] = res
    for dtype in ("float32", "bfloat16"):
        out[f"torch_eager_{dtype}"] = torch_speed_child(model, dtype, prompt, decode, threads)
    best_torch = max(out[f"torch_eager_{d}"]["decode_tok_s"] for d in ("float32", "bfloat16"))
    out["targets"] = {
        f"decode_{q}_faster_than_torch_eager": out[f"mlc_{q}"]["run_host_cpu"]["decode_tok_s"] > best_torch for q in QUANTS
    }
    out["model"] = name
    return out


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
    ap.add_argument("-o", "--output", default="benchmarks/runtime.json")
    a = ap.parse_args(argv)
    work = Path(a.work)
    synth = work / "synthetic-model"
    if not (synth / "config.json").is_file():
        make_checkpoint(synth, a.hidden, a.layers, a.vocab, shards=1, heads=a.heads)
    tok_src = Path(a.tiny_model) if Path(a.tiny_model).is_dir() else None
    if tok_src is None:
        raise SystemExit(f"need a tokenizer: build the tiny model first ({a.tiny_model})")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tok_src / f, synth / f)
    results = {
        "cpu_count": os.cpu_count(),
        "threads": a.threads,
        "prompt_tokens": a.prompt,
        "decode_tokens": a.decode,
        "synthetic": bench_model(f"synthetic GPT-NeoX h{a.hidden} L{a.layers} V{a.vocab}", synth, work / "synthetic", a.prompt, a.decode, a.threads, 1024),
        "tiny": bench_model("tiny", tok_src, work / "tiny", min(a.prompt, 128), a.decode, a.threads, 256),
    }
    write_result(a.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
