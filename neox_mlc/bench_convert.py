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
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neox_mlc.benchtools import GIB, make_checkpoint, run_child, write_result


def bench(model: Path, work: Path) -> dict[str, Any]:
    src_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    run_child(f"import pathlib\n[p.read_bytes() for p in pathlib.Path({str(model)!r}).glob('*.safetensors')]")  # warm the page cache
    results: dict[str, Any] = {"source_bytes": src_bytes}
    for quant in ("q4f16_1", "q0f16"):
        out = work / quant
        r = run_child(
            "import json, shutil, pathlib\nfrom neox_mlc.convert_weight import convert\n"
            f"shutil.rmtree({str(out)!r}, ignore_errors=True)\nconvert({str(model)!r}, {quant!r}, {str(out)!r})\n"
            f"print(json.dumps({{'output_bytes': sum(p.stat().st_size for p in pathlib.Path({str(out)!r}).glob('*.bin'))}}))"
        )
        r["source_MBps"] = round(src_bytes / r["wall_s"] / 1e6, 1)
        results[f"convert_{quant}"] = r
    out_bytes = results["convert_q4f16_1"]["output_bytes"]
    # The floor and the peer read with plain file reads (one tensor at a time), not our mmap reader.
    read_tensor = (
        "from neox_mlc.hf_checkpoint import TensorIndex\n"
        "def read(info):\n    with open(info.file, 'rb') as fh:\n        fh.seek(info.offset); return fh.read(info.nbytes)\n"
    )
    results["floor_read_write"] = run_child(
        read_tensor + "import numpy as np\n"
        f"ix = TensorIndex({str(model)!r}); n = 0\nf = open({str(work / 'floor.bin')!r}, 'wb')\n"
        f"for info in ix.tensors.values():\n    n += len(read(info))\n"
        f"left = {out_bytes}\nblock = bytes(1 << 24)\nwhile left > 0:\n    f.write(block[: min(left, len(block))]); left -= len(block)\nf.close()\n"
    )
    results["floor_read_write"]["source_MBps"] = round(src_bytes / results["floor_read_write"]["wall_s"] / 1e6, 1)
    results["gguf_q4_0_numpy"] = run_child(
        read_tensor + "import json, time, numpy as np, gguf\nfrom gguf import quants\n"
        f"ix = TensorIndex({str(model)!r}); t = 0.0; b = 0\n"
        "for name, info in ix.tensors.items():\n    if len(info.shape) != 2: continue\n"
        "    a = np.frombuffer(read(info), dtype=np.float16).reshape(info.shape).astype(np.float32); s = time.perf_counter()\n"
        "    quants.quantize(a, gguf.GGMLQuantizationType.Q4_0); t += time.perf_counter() - s; b += info.nbytes\n"
        "print(json.dumps({'quantize_s': round(t, 3), 'f16_equivalent_MBps': round(b / t / 1e6, 1)}))"
    )
    conv = results["convert_q4f16_1"]
    from neox_mlc.hf_checkpoint import TensorIndex

    largest_tensor = max(i.nbytes for i in TensorIndex(model).tensors.values())
    results["targets"] = {
        "q4f16_1_vs_floor_ratio": round(conv["wall_s"] / results["floor_read_write"]["wall_s"], 2),
        "q4f16_1_le_2x_floor": conv["wall_s"] <= 2 * results["floor_read_write"]["wall_s"],
        "q4f16_1_faster_than_gguf_q4_0": conv["wall_s"] < results["gguf_q4_0_numpy"]["quantize_s"],
        "rss_limit_gib": round(1 + 2 * largest_tensor / GIB, 3),
        "rss_within_limit": max(results[f"convert_{q}"]["peak_rss_gib"] for q in ("q4f16_1", "q0f16")) < 1 + 2 * largest_tensor / GIB,
    }
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
    from neox_mlc.hf_checkpoint import TensorIndex

    info["params"] = int(sum(np.prod(t.shape) for t in TensorIndex(model).tensors.values()))
    result = {"model": {"hidden": a.hidden, "layers": a.layers, "vocab": a.vocab, **info}, "cpu_count": os.cpu_count(), **bench(model, work)}
    write_result(a.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
