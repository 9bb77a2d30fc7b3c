"""Quality and speed of a bundle against the unquantized model, llama.cpp-style.

Why: "answers got noticeably worse after 4-bit quantization" was never measured. This writes, per
model × quantization, ``quality.json`` with the numbers llama.cpp's ``llama-perplexity`` reports:

* perplexity of the compiled bundle on an evaluation text, and ΔPPL / PPL ratio against the
  reference (transformers float32 on the original checkpoint);
* KL divergence KL(reference ‖ bundle) of next-token distributions, mean and 99th percentile;
* top-1 agreement: how often both pick the same next token;
* greedy answers to the same prompts, side by side;
* speed of the compiled library on the host (prefill and decode tokens/s), bundle size, peak RSS.

The same metrics are computed for peers — ``gguf``'s numpy quantizers (Q4_0, Q4_1, Q8_0) applied to
the same checkpoint, run through transformers on the dequantized weights — so one table compares them.
The text is cut into windows of at most the context window; every position but the first of a
window is scored.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


import numpy as np

from neox_mlc.common import WorkflowError, read_json, run_cli, write_json
from neox_mlc.quantization import GGUF_PEER_TYPES

DEFAULT_PROMPTS = ("日本で一番高い山は何ですか?", "雨の日の過ごし方を提案してください。")


# ---------------------------------------------------------------- metrics (pure, known-answer tested)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _nll(logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return -logp[np.arange(len(targets)), targets]


def _kl(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under the logits that predict it."""
    return _nll(log_softmax(logits), targets)


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(np.mean(nll)))


def kl_divergence(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """KL(P_ref ‖ P_test) per position, in nats."""
    return _kl(log_softmax(ref_logits), log_softmax(test_logits))


def top1_agreement(ref_logits: np.ndarray, test_logits: np.ndarray) -> float:
    """Percentage of positions where both models rank the same token first."""
    return float(100.0 * np.mean(ref_logits.argmax(-1) == test_logits.argmax(-1)))


def compare(ref_logits: np.ndarray, test_logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """All quality metrics of ``test`` against ``ref`` on the same scored positions.

    Each side's log-softmax is computed once (float64 over the vocabulary is the costly part).
    """
    lp, lq = log_softmax(ref_logits), log_softmax(test_logits)
    ppl_ref = perplexity(_nll(lp, targets))
    ppl = perplexity(_nll(lq, targets))
    kl = _kl(lp, lq)
    return {
        "ppl": ppl,
        "ppl_reference": ppl_ref,
        "delta_ppl": ppl - ppl_ref,
        "ppl_ratio": ppl / ppl_ref,
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.percentile(kl, 99)),
        "top1_agreement_pct": top1_agreement(ref_logits, test_logits),
        "scored_tokens": int(len(targets)),
    }


# ---------------------------------------------------------------- data


def eval_windows(ids: list[int], window: int, max_tokens: int) -> list[list[int]]:
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise WorkflowError(f"evaluation text gives {len(ids)} tokens; at least 2 are needed")
    return [ids[i : i + window] for i in range(0, len(ids) - 1, window) if len(ids[i : i + window]) >= 2]


def load_text(text: str | None, hf_dataset: str | None, split: str | None) -> str:
    """The evaluation text: a local file, or the ``text`` column of a Hugging Face dataset split."""
    if hf_dataset:
        try:
            from datasets import load_dataset  # optional: only for dataset-based evaluation
        except ImportError:
            raise WorkflowError("evaluation.hf_dataset needs the 'datasets' package (pip install datasets)") from None
        data = load_dataset(hf_dataset, split=split or "test")
        return "\n".join(data["text"])
    if not text or not Path(text).is_file():
        raise WorkflowError(f"evaluation text not found: {text}")
    return Path(text).read_text(encoding="utf-8")


def stack_windows(fn: Any, windows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Logits predicting positions 1..n-1 of each window, and those target tokens."""
    logits, targets = [], []
    for w in windows:
        logits.append(fn(w)[:-1])
        targets.append(np.asarray(w[1:]))
    return np.concatenate(logits), np.concatenate(targets)


# ---------------------------------------------------------------- runs


def greedy_runtime(rt: Any, ids: list[int], n: int, stop: set[int]) -> list[int]:
    rt.reset()
    logits = rt.prefill(ids)
    out: list[int] = []
    for _ in range(n):
        t = int(logits.argmax())
        if t in stop or rt.length >= rt.context_window:
            break
        out.append(t)
        logits = rt.decode(t)
    return out


def greedy_hf(model: Any, ids: list[int], n: int, stop: set[int]) -> list[int]:
    from neox_mlc.reference import hf_logits

    seq, out = list(ids), []
    for _ in range(n):
        t = int(hf_logits(model, seq)[-1].argmax())
        if t in stop:
            break
        out.append(t)
        seq.append(t)
    return out


def speed(rt: Any, prompt_len: int = 128, decode_steps: int = 64) -> dict[str, float]:
    """Host prefill and decode throughput of the compiled library (tokens/s)."""
    prompt_len = max(1, min(prompt_len, rt.context_window - decode_steps - 1))
    ids = [5 + (i * 7) % 200 for i in range(prompt_len)]
    rt.reset()
    rt.prefill(ids[:8])  # warm-up: first calls allocate
    rt.reset()
    t0 = time.perf_counter()
    logits = rt.prefill(ids)
    t1 = time.perf_counter()
    for _ in range(decode_steps):
        logits = rt.decode(int(logits.argmax()))
    t2 = time.perf_counter()
    return {"prompt_tokens": prompt_len, "decode_tokens": decode_steps, "prefill_tok_s": prompt_len / (t1 - t0), "decode_tok_s": decode_steps / (t2 - t1)}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def evaluate_bundle(
    model_dir: Path, tokenizer: Path, params: Path, lib: Path, chat_config: Path, text: str, max_tokens: int,
    prompts: Sequence[str], answer_tokens: int = 24,
) -> dict[str, Any]:
    """quality.json content for one compiled bundle."""
    from tokenizers import Tokenizer

    from neox_mlc.chat import format_prompt
    from neox_mlc.reference import hf_logits, load_hf_model
    from neox_mlc.runtime import ModelRuntime

    cfg = read_json(chat_config, "chat config")
    tok = Tokenizer.from_file(str(tokenizer))
    rt = ModelRuntime(lib, params, chat_config)
    spd = speed(rt)
    spd["peak_rss_gib_runtime"] = peak_rss_gib()
    windows = eval_windows(tok.encode(text, add_special_tokens=False).ids, min(rt.context_window, rt.prefill_chunk), max_tokens)

    def bundle_fn(w: list[int]) -> np.ndarray:
        rt.reset()
        return rt.prefill_all_logits(w)

    test_logits, targets = stack_windows(bundle_fn, windows)
    ref_model = load_hf_model(model_dir)
    ref_logits, _ = stack_windows(lambda w: hf_logits(ref_model, w), windows)
    template = cfg["conv_template"]
    stop = set(template["stop_token_ids"]) | {cfg["eos_token_id"]}
    answers = []
    for p in prompts:
        ids = tok.encode(format_prompt(template, [], p), add_special_tokens=False).ids
        answers.append({
            "prompt": p,
            "bundle": tok.decode(greedy_runtime(rt, ids, answer_tokens, stop)),
            "reference": tok.decode(greedy_hf(ref_model, ids, answer_tokens, stop)),
        })
    index = read_json(Path(params) / "tensor-cache.json", "tensor cache")
    size = sum((Path(params) / s["dataPath"]).stat().st_size for s in index["records"])
    return {
        "method": f"mlc {cfg['quantization']}",
        "quantization": cfg["quantization"],
        "bits_per_param": index["metadata"]["BitsPerParam"],
        "params_bytes_on_disk": size,
        "library_bytes": Path(lib).stat().st_size,
        **compare(ref_logits, test_logits, targets),
        "speed_host_cpu": spd,
        "answers": answers,
    }


def gguf_dequantized_state(model_dir: Path, gtype: str) -> tuple[dict[str, np.ndarray], int, float]:
    """HF weights passed through gguf's numpy quantizer and back; returns (state, bytes, bits/param)."""
    import gguf
    from gguf import quants

    from neox_mlc.hf_checkpoint import TensorIndex

    qtype = getattr(gguf.GGMLQuantizationType, gtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    index = TensorIndex(model_dir)
    state, nbytes, numel = {}, 0, 0
    for name, info in index.tensors.items():
        value = index.read(name).astype(np.float32)
        numel += value.size
        if value.ndim == 2 and value.shape[1] % block == 0:
            state[name] = quants.dequantize(quants.quantize(value, qtype), qtype).reshape(value.shape)
            nbytes += value.size // block * type_size
        else:
            state[name] = value
            nbytes += value.size * 2
    return state, nbytes, nbytes * 8 / numel


def evaluate_gguf(model_dir: Path, tokenizer: Path, gtype: str, text: str, window: int, max_tokens: int) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from neox_mlc.reference import hf_logits, load_hf_model

    tok = Tokenizer.from_file(str(tokenizer))
    windows = eval_windows(tok.encode(text, add_special_tokens=False).ids, window, max_tokens)
    ref = load_hf_model(model_dir)
    ref_logits, targets = stack_windows(lambda w: hf_logits(ref, w), windows)
    state, nbytes, bits = gguf_dequantized_state(model_dir, gtype)
    test = load_hf_model(model_dir, state)
    test_logits, _ = stack_windows(lambda w: hf_logits(test, w), windows)
    return {"method": f"gguf {gtype} (numpy)", "quantization": gtype, "bits_per_param": bits, "params_bytes_on_disk": nbytes, **compare(ref_logits, test_logits, targets)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", help="original HF checkpoint (the reference)")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json (the workflow's tokenizer step)")
    ap.add_argument("--params", help="bundle params directory (tensor-cache.json)")
    ap.add_argument("--lib", help="host (llvm) model library")
    ap.add_argument("--chat-config")
    ap.add_argument("--gguf-type", choices=GGUF_PEER_TYPES, help="evaluate a gguf peer instead of a bundle")
    # llama.cpp's own inference as a peer row (#15; neox_mlc/llamacpp.py, needs the optional llama-cpp-python)
    ap.add_argument("--llama-cpp-type", choices=["F16", "Q8_0", "Q4_0"], help="evaluate llama.cpp itself on its GGUF of this type")
    ap.add_argument("--window", type=int, default=256, help="evaluation window for gguf peers (bundles use their context window)")
    ap.add_argument("--text")
    ap.add_argument("--hf-dataset")
    ap.add_argument("--split")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--prompt", action="append", default=[])
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    text = load_text(a.text, a.hf_dataset, a.split)
    model_dir = Path(a.model_dir)
    if a.llama_cpp_type:
        from neox_mlc.llamacpp import evaluate_llama_cpp

        result = evaluate_llama_cpp(model_dir, Path(a.tokenizer), a.llama_cpp_type, text, a.window, a.max_tokens)
    elif a.gguf_type:
        result = evaluate_gguf(model_dir, Path(a.tokenizer), a.gguf_type, text, a.window, a.max_tokens)
    else:
        if not (a.params and a.lib and a.chat_config):
            raise WorkflowError("bundle evaluation needs --params, --lib and --chat-config")
        result = evaluate_bundle(
            model_dir, Path(a.tokenizer), Path(a.params), Path(a.lib), Path(a.chat_config), text, a.max_tokens, a.prompt or DEFAULT_PROMPTS
        )
    result["peak_rss_gib"] = peak_rss_gib()
    write_json(a.output, result)
    return 0


if __name__ == "__main__":
    run_cli(main)
