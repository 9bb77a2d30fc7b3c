"""Benchmark helpers: synthetic GPT-NeoX checkpoints and child processes measured one by one.

Why separate processes: each measurement's peak memory must be its own, and a warm parent (that
just generated gigabytes of weights) must not be counted.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30


def copy_workflow(dest: Path, names: Sequence[str]) -> Path:
    """Copy the named top-level entries of this checkout (the workflow's sources, no outputs) into ``dest``."""
    for name in names:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def make_checkpoint(out: Path, hidden: int, layers: int, vocab: int, shards: int, seed: int = 0, heads: int | None = None) -> dict[str, Any]:
    """Write a GPT-NeoX safetensors checkpoint (float16, random) in ``shards`` files plus its index."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    heads = heads or max(1, hidden // 128)
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


def run_child(code: str, python: str = sys.executable, env: dict[str, str] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run Python code in a child (``python``, extra ``env``); return wall time, peak RSS and what it printed as JSON.

    With ``timeout`` (seconds) a child still running then is killed and ``subprocess.TimeoutExpired`` raised.
    """
    # The child reports its own VmHWM: getrusage/wait4 maxrss would include the RSS this parent had
    # when it forked (Linux keeps it across exec), which is several GB after making a checkpoint.
    code += "\nimport json as _j\nprint(_j.dumps({'__hwm_kb': int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])}))"
    start = time.perf_counter()
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([python, "-c", code], check=False, cwd=REPO, stdout=subprocess.PIPE, text=True, env=full_env, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({proc.returncode}): {code[:200]}")
    lines = [json.loads(ln) for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    extra = {k: v for d in lines for k, v in d.items() if k != "__hwm_kb"}
    hwm = [d["__hwm_kb"] for d in lines if "__hwm_kb" in d][-1]
    return {"wall_s": round(wall, 3), "peak_rss_gib": round(hwm * 1024 / GIB, 3), **extra}




def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's alternating runs summarised: median of every number, and the runs themselves."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {**{k: statistics.median(r[k] for r in runs) for k in keys}, "runs": runs}


class LoadGenerator:
    """``n`` busy-looping processes (a synthetic CPU load) while the ``with`` block runs."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Self:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """Write a benchmark's JSON (and echo it) where the README's tables are read from."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
