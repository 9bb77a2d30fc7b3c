"""Kernel-level timing of the host attention kernels: TVM's scalar ones against neox_mlc/cpu_attention.py.

Why a separate benchmark: the decode profile (runtime.kernel_profile) sees one VM builtin per layer
(RoPE, KV append and attention together), and prefill attention is a small part of a prefill. Here
each kernel runs alone on a random float16 cache of the model's shape, as the runtime calls it:

* ``warm``: the same call repeated (cache and pages in CPU caches);
* ``cold``: 64 MiB written between calls, as in a decode step where every layer's weights stream
  through the caches between two reads of that layer's KV.

Times are the median wall time of the packed-function call from Python (a few µs of call overhead
included), on the threads ``TVM_NUM_THREADS`` gives.

    TVM_NUM_THREADS=1 python -m neox_mlc.bench_attention --out docs/benchmarks/attention-kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PAGE = 16
# (label, heads, head dim, context or prompt tokens)
SHAPES = [("162.5M", 12, 64, 140), ("LINE 3.6B", 32, 96, 140), ("LINE 3.6B", 32, 96, 2048)]
PREFILL_SHAPES = [("162.5M", 12, 64, 128), ("LINE 3.6B", 32, 96, 128)]


def _timed(fn: Callable[[], Any], reps: int, flush: np.ndarray | None) -> float:
    """Median seconds of ``fn()``; ``flush`` (when given) is rewritten before each call."""
    fn()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush += 1
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _compile(func: Any) -> Any:
    import tvm

    from neox_mlc.compile import make_target

    return tvm.compile(tvm.IRModule({"main": func}), target=make_target("llvm"))["main"]


def decode_case(heads: int, dim: int, context: int, reps: int, flush: np.ndarray) -> dict[str, float]:
    """One decode step of one layer: one sequence, ``context`` cached tokens on shuffled pages."""
    import tvm
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    from neox_mlc.cpu_attention import decode_paged_kv

    rng = np.random.default_rng(0)
    n_pages = -(-context // PAGE)
    host = [
        rng.standard_normal((1, heads, dim)).astype("float16"),
        rng.standard_normal((2 * n_pages, 2, heads, PAGE, dim)).astype("float16"),
        np.array([0, n_pages], "int32"),
        rng.permutation(2 * n_pages)[:n_pages].astype("int32"),
        np.array([context - (n_pages - 1) * PAGE], "int32"),
        np.zeros(1, "int32"),
        np.zeros(1, "int32"),
        np.zeros((1, heads, dim), "float16"),
        np.zeros((1, heads), "float32"),
    ]
    args = [tvm.runtime.tensor(a) for a in host] + [0, 1.0, 10000.0, 1 / dim**0.5]
    out = {}
    for impl, make in (("tvm", _attention_decode_cpu), ("ours", decode_paged_kv)):
        fn = _compile(make(heads, heads, dim, "float16", False, {}))
        for mode, buf in (("warm", None), ("cold", flush)):
            out[f"{impl}_{mode}_us"] = round(
                _timed(lambda fn=fn: fn(*args), reps if impl == "ours" else max(3, reps // 5), buf) * 1e6, 1
            )
    return out


def prefill_case(heads: int, dim: int, tokens: int, reps: int) -> dict[str, float]:
    """The causal self-attention of a ``tokens``-token prefill of one layer (the ragged kernel)."""
    import tvm
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

    from neox_mlc.cpu_attention import prefill_ragged_kv

    rng = np.random.default_rng(0)
    qkv = [rng.standard_normal((tokens, heads, dim)).astype("float16") for _ in range(3)]
    indptr = np.array([0, tokens], "int32")
    host = [
        qkv[0],
        indptr,
        qkv[1],
        qkv[2],
        indptr,
        np.zeros(tokens, "int32"),
        np.zeros(1, "int32"),
        np.zeros((tokens, heads, dim), "float16"),
        np.zeros((tokens, heads), "float32"),
    ]
    args = [tvm.runtime.tensor(a) for a in host] + [1, 0, 1.0, 10000.0, 1 / dim**0.5]
    out = {}
    for impl, make in (("tvm", _attention_prefill_ragged_cpu), ("ours", prefill_ragged_kv)):
        fn = _compile(make(heads, heads, dim, dim, "float16", {}))
        out[f"{impl}_ms"] = round(_timed(lambda fn=fn: fn(*args), reps if impl == "ours" else 3, None) * 1e3, 3)
    return out


def run(reps: int) -> dict[str, Any]:
    from neox_mlc.bench_runtime import cpu_name

    flush = np.zeros(64 << 20, np.uint8)
    decode = [{"model": m, "heads": h, "head_dim": d, "context": c, **decode_case(h, d, c, reps, flush)} for m, h, d, c in SHAPES]
    prefill = [
        {"model": m, "heads": h, "head_dim": d, "tokens": t, **prefill_case(h, d, t, reps)} for m, h, d, t in PREFILL_SHAPES
    ]
    return {
        "note": __doc__.split("\n\n")[0] + " float16 KV, page size 16, one sequence; times per call of one layer's kernel.",
        "threads": os.environ.get("TVM_NUM_THREADS", "default"),
        "cpu": cpu_name(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "decode": decode,
        "prefill_causal": prefill,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--out", type=Path, help="write the JSON here (printed either way)")
    a = ap.parse_args(argv)
    result = run(a.reps)
    if a.out:
        from neox_mlc.benchtools import write_result

        write_result(a.out, result)
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
