"""Benchmark weight conversion on a synthetic ≥1 B-parameter GPT-NeoX checkpoint; writes JSON.

Why a script and not a test: speed depends on the machine, so targets are reported, not asserted
(``meets_targets`` in the JSON). Each measurement runs in its own process so that its peak RSS is its
own (``os.wait4``). Measured side by side in one run, files in page cache:

* this project's converter, q4f16_1 and q0f16 (source MB/s = checkpoint bytes / wall time);
* the floor: read every source tensor and write as many bytes as q4f16_1 produces;
* ``gguf``'s numpy ``quants.quantize(..., Q4_0)`` on the same 2-D tensors (quantize time only,
  float32 input, as llama.cpp's Python package does it).

Targets (issue #3): converter q4f16_1 ≤ 2× the floor's time and faster than gguf's numpy Q4_0;
peak RSS < 1 GiB + 2 × the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30


def make_checkpoint(out: Path, hidden: int, layers: int, vocab: int, shards: int, seed: int = 0) -> dict[str, Any]:
    """Write a GPT-NeoX safetensors checkpoint (float16, random) in ``shards`` files plus its index."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    heads = hidden // 128
    inter = 4 * hidden
    cfg = {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": inter,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rotary_pct": 0.25, "rotary_emb_base": 10000,
        "layer_norm_eps": 1e-5, "use_parallel_residual": True, "hidden_act": "gelu", "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float16",
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)

    def mat(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    names: list[tuple[str, tuple[int, ...]]] = [("gpt_neox.embed_in.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        names += [(p + n, (hidden,)) for n in ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight", "post_attention_layernorm.bias", "attention.dense.bias", "mlp.dense_4h_to_h.bias")]
        names += [(p + "attention.query_key_value.weight", (3 * hidden, hidden)), (p + "attention.query_key_value.bias", (3 * hidden,)),
                  (p + "attention.dense.weight", (hidden, hidden)), (p + "mlp.dense_h_to_4h.weight", (inter, hidden)),
                  (p + "mlp.dense_h_to_4h.bias", (inter,)), (p + "mlp.dense_4h_to_h.weight", (hidden, inter))]
    names += [("gpt_neox.final_layer_norm.weight", (hidden,)), ("gpt_neox.final_layer_norm.bias", (hidden,)), ("embed_out.weight", (vocab, hidden))]
    per = -(-len(names) // shards)
    weight_map, params = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: mat(*shape) for n, shape in names[s * per : (s + 1) * per]}
        params += sum(v.size for v in chunk.values())
        save_file(chunk, out / fname)
        weight_map.update({n: fname for n in chunk})
        del chunk
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"params": int(params), "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}


def _run(code: str) -> dict[str, Any]:
    """Run Python code in a child; return wall time, peak RSS and what it printed as JSON."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"benchmark child failed ({status}): {code[:200]}")
    extra = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return {"wall_s": round(wall, 3), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 3), **extra}


def bench(model: Path, work: Path) -> dict[str, Any]:
    src_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    _run(f"import pathlib\n[p.read_bytes() for p in pathlib.Path({str(model)!r}).glob('*.safetensors')]")  # warm the page cache
    results: dict[str, Any] = {"source_bytes": src_bytes}
    for quant in ("q4f16_1", "q0f16"):
        out = work / quant
        r = _run(
            "import json, shutil, pathlib\nfrom scripts.convert_weight import convert\n"
            f"shutil.rmtree({str(out)!r}, ignore_errors=True)\nconvert({str(model)!r}, {quant!r}, {str(out)!r})\n"
            f"print(json.dumps({{'output_bytes': sum(p.stat().st_size for p in pathlib.Path({str(out)!r}).glob('*.bin'))}}))"
        )
        r["source_MBps"] = round(src_bytes / r["wall_s"] / 1e6, 1)
        results[f"convert_{quant}"] = r
    out_bytes = results["convert_q4f16_1"]["output_bytes"]
    results["floor_read_write"] = _run(
        "import numpy as np, os\nfrom scripts.hf_checkpoint import TensorIndex\n"
        f"ix = TensorIndex({str(model)!r}); n = 0\nf = open({str(work / 'floor.bin')!r}, 'wb')\n"
        f"for name in ix.tensors:\n    a = ix.read(name); n += a.nbytes\n"
        f"left = {out_bytes}\nblock = bytes(1 << 24)\nwhile left > 0:\n    f.write(block[: min(left, len(block))]); left -= len(block)\nf.close()\n"
    )
    results["floor_read_write"]["source_MBps"] = round(src_bytes / results["floor_read_write"]["wall_s"] / 1e6, 1)
    results["gguf_q4_0_numpy"] = _run(
        "import json, time, numpy as np, gguf\nfrom gguf import quants\nfrom scripts.hf_checkpoint import TensorIndex\n"
        f"ix = TensorIndex({str(model)!r}); t = 0.0; b = 0\n"
        "for name, info in ix.tensors.items():\n    if len(info.shape) != 2: continue\n"
        "    a = ix.read(name).astype(np.float32); s = time.perf_counter()\n"
        "    quants.quantize(a, gguf.GGMLQuantizationType.Q4_0); t += time.perf_counter() - s; b += info.nbytes\n"
        "print(json.dumps({'quantize_s': round(t, 3), 'f16_equivalent_MBps': round(b / t / 1e6, 1)}))"
    )
    largest = max(p.stat().st_size for p in model.glob("*.safetensors"))
    conv = results["convert_q4f16_1"]
    from scripts.hf_checkpoint import TensorIndex

    largest_tensor = max(i.nbytes for i in TensorIndex(model).tensors.values())
    results["targets"] = {
        "q4f16_1_vs_floor_ratio": round(conv["wall_s"] / results["floor_read_write"]["wall_s"], 2),
        "q4f16_1_le_2x_floor": conv["wall_s"] <= 2 * results["floor_read_write"]["wall_s"],
        "q4f16_1_faster_than_gguf_q4_0": conv["wall_s"] < results["gguf_q4_0_numpy"]["quantize_s"],
        "rss_limit_gib": round(1 + 2 * largest_tensor / GIB, 3),
        "rss_within_limit": max(results[f"convert_{q}"]["peak_rss_gib"] for q in ("q4f16_1", "q0f16")) < 1 + 2 * largest_tensor / GIB,
    }
    del largest
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="benchmarks/convert-work", help="scratch directory (several GB)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=50432)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("-o", "--output", default="benchmarks/convert.json")
    a = ap.parse_args(argv)
    work = Path(a.work)
    model = work / "model"
    if not (model / "config.json").is_file():
        info = make_checkpoint(model, a.hidden, a.layers, a.vocab, a.shards)
    else:
        info = {"params": None, "bytes": sum(p.stat().st_size for p in model.glob("*.safetensors"))}
    from scripts.hf_checkpoint import TensorIndex

    info["params"] = int(sum(np.prod(t.shape) for t in TensorIndex(model).tensors.values()))
    result = {"model": {"hidden": a.hidden, "layers": a.layers, "vocab": a.vocab, **info}, "cpu_count": os.cpu_count(), **bench(model, work)}
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
