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
The text holds one document per line (``<NL>`` inside a line is the template's newline); each line
is tokenized alone and followed by ``</s>``, as the trained evaluation model saw its pages. The token
stream is cut into windows ("chunks") of at most the context window; every position but the first of
a window is scored. ΔPPL and mean KL get 95 % bootstrap confidence intervals over those chunks
(positions within a chunk are not independent; chunks nearly are), and per-chunk sums are kept in the
report so that two methods can be compared pairwise on the same chunks (``neox_mlc.summarize``).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neox_mlc.common import WorkflowError, read_json, run_cli, write_json
from neox_mlc.llamacpp import FTYPES as LLAMA_CPP_TYPES
from neox_mlc.quantization import GGUF_PEER_TYPES
from neox_mlc.spm_tokenizer import piece_id

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


BOOTSTRAP_SAMPLES = 2000


def position_metrics(ref_logits: np.ndarray, test_logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per scored position: NLL under each model, KL(ref ‖ test), and whether the top-1 tokens agree.

    Each side's log-softmax is computed once (float64 over the vocabulary is the costly part).
    """
    lp, lq = log_softmax(ref_logits), log_softmax(test_logits)
    return {
        "nll_reference": _nll(lp, targets),
        "nll": _nll(lq, targets),
        "kl": _kl(lp, lq),
        "agree": (ref_logits.argmax(-1) == test_logits.argmax(-1)).astype(np.float64),
    }


def bootstrap_ci(stat: Any, sums: dict[str, np.ndarray], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of ``stat(resampled chunk sums)``, resampling whole chunks with replacement.

    ``sums`` maps a name to one value per chunk; ``stat`` gets the same names with arrays of shape
    ``[samples]`` (the column sums of each resample). A fixed seed keeps reports reproducible.
    """
    n = len(next(iter(sums.values())))
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    values = stat({k: np.asarray(v, dtype=np.float64)[idx].sum(axis=1) for k, v in sums.items()})
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def _ppl_delta(s: dict[str, np.ndarray]) -> np.ndarray:
    return np.exp(s["nll"] / s["tokens"]) - np.exp(s["nll_reference"] / s["tokens"])


def _ppl_ref(s: dict[str, np.ndarray]) -> np.ndarray:
    return np.exp(s["nll_reference"] / s["tokens"])


def _kl_mean(s: dict[str, np.ndarray]) -> np.ndarray:
    return s["kl"] / s["tokens"]


def compare(ref_logits: np.ndarray, test_logits: np.ndarray, targets: np.ndarray, chunk_sizes: list[int] | None = None) -> dict[str, Any]:
    """All quality metrics of ``test`` against ``ref`` on the same scored positions.

    ``chunk_sizes`` splits the positions into the evaluation windows (one chunk if omitted); the
    confidence intervals resample those chunks.
    """
    sizes = chunk_sizes or [len(targets)]
    if sum(sizes) != len(targets):
        raise ValueError(f"chunk sizes sum to {sum(sizes)}, not the {len(targets)} scored positions")
    return aggregate(position_metrics(ref_logits, test_logits, targets), sizes)


def compare_windows(ref_fn: Any, test_fn: Any, windows: list[list[int]]) -> dict[str, Any]:
    """``compare`` over windows, one window's logits in memory at a time (vocabulary × window × 2 sides)."""
    parts = []
    for w in windows:
        parts.append(position_metrics(ref_fn(w)[:-1], test_fn(w)[:-1], np.asarray(w[1:])))
    pos = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return aggregate(pos, chunk_sizes(windows))


def aggregate(pos: dict[str, np.ndarray], sizes: list[int]) -> dict[str, Any]:
    """Report figures from per-position metrics split into chunks of ``sizes`` positions."""
    bounds = np.cumsum([0, *sizes])[:-1]
    chunks = {"tokens": np.asarray(sizes, dtype=np.float64)}
    for key in ("nll_reference", "nll", "kl"):
        chunks[key] = np.add.reduceat(pos[key], bounds)
    ppl_ref = perplexity(pos["nll_reference"])
    ppl = perplexity(pos["nll"])
    return {
        "ppl": ppl,
        "ppl_reference": ppl_ref,
        "ppl_reference_ci95": bootstrap_ci(_ppl_ref, chunks),
        "delta_ppl": ppl - ppl_ref,
        "delta_ppl_ci95": bootstrap_ci(_ppl_delta, chunks),
        "ppl_ratio": ppl / ppl_ref,
        "kl_mean": float(pos["kl"].mean()),
        "kl_mean_ci95": bootstrap_ci(_kl_mean, chunks),
        "kl_p99": float(np.percentile(pos["kl"], 99)),
        "top1_agreement_pct": float(100.0 * pos["agree"].mean()),
        "scored_tokens": int(sum(sizes)),
        "chunks": {k: [float(f"{x:.9g}") for x in v] for k, v in chunks.items()},
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


def text_ids(tok: Any, text: str) -> list[int]:
    """Each non-empty line tokenized alone and followed by ``</s>``: documents as the model was trained on them."""
    eos = piece_id(tok, "</s>")
    if eos is None:
        raise WorkflowError("the tokenizer has no </s> token to separate evaluation documents")
    ids: list[int] = []
    for enc in tok.encode_batch([line for line in text.splitlines() if line.strip()], add_special_tokens=False):
        ids += enc.ids + [eos]
    return ids


def stack_windows(fn: Any, windows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Logits predicting positions 1..n-1 of each window, and those target tokens."""
    logits, targets = [], []
    for w in windows:
        logits.append(fn(w)[:-1])
        targets.append(np.asarray(w[1:]))
    return np.concatenate(logits), np.concatenate(targets)


def chunk_sizes(windows: list[list[int]]) -> list[int]:
    """Scored positions per window (all but the first)."""
    return [len(w) - 1 for w in windows]


def unigram_baseline(tok: Any, train_text: str, eval_text: str, window: int, max_tokens: int) -> dict[str, Any]:
    """Perplexity of a unigram model (training-text token counts, add-one smoothed) on the scored positions.

    Why: a perplexity alone does not say whether a model learned anything; beating the best
    context-free guess on unseen text does. Scored exactly as ``compare`` scores the models.
    """
    counts = np.bincount(text_ids(tok, train_text), minlength=tok.get_vocab_size()).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    windows = eval_windows(text_ids(tok, eval_text), window, max_tokens)
    targets = np.concatenate([np.asarray(w[1:]) for w in windows])
    nll = -logp[targets]
    sizes = chunk_sizes(windows)
    sums = {"nll_reference": np.add.reduceat(nll, np.cumsum([0, *sizes])[:-1]), "tokens": np.asarray(sizes, dtype=np.float64)}
    return {
        "method": "unigram (training-text counts)",
        "ppl_unigram": perplexity(nll),
        "ppl_unigram_ci95": bootstrap_ci(_ppl_ref, sums),
        "scored_tokens": len(targets),
        "training_tokens": int(counts.sum() - len(counts)),
    }


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

    from neox_mlc.reference import hf_logits, load_hf_model
    from neox_mlc.runtime import ModelRuntime

    cfg = read_json(chat_config, "chat config")
    tok = Tokenizer.from_file(str(tokenizer))
    rt = ModelRuntime(lib, params, chat_config)
    spd = speed(rt)
    spd["peak_rss_gib_runtime"] = peak_rss_gib()
    windows = eval_windows(text_ids(tok, text), min(rt.context_window, rt.prefill_chunk), max_tokens)

    def bundle_fn(w: list[int]) -> np.ndarray:
        rt.reset()
        return rt.prefill_all_logits(w)

    ref_model = load_hf_model(model_dir)
    metrics = compare_windows(lambda w: hf_logits(ref_model, w), bundle_fn, windows)
    template = cfg["conv_template"]
    stop = set(template["stop_token_ids"]) | {cfg["eos_token_id"]}
    answers = side_by_side(tok, template, prompts, lambda ids: greedy_runtime(rt, ids, answer_tokens, stop),
                           lambda ids: greedy_hf(ref_model, ids, answer_tokens, stop))  # fmt: skip
    index = read_json(Path(params) / "tensor-cache.json", "tensor cache")
    size = sum((Path(params) / s["dataPath"]).stat().st_size for s in index["records"])
    return {
        "method": f"mlc {cfg['quantization']}",
        "quantization": cfg["quantization"],
        "bits_per_param": index["metadata"]["BitsPerParam"],
        "params_bytes_on_disk": size,
        "library_bytes": Path(lib).stat().st_size,
        **metrics,
        "speed_host_cpu": spd,
        "answers": answers,
    }


def gguf_dequantized_state(model_dir: Path, gtype: str) -> tuple[dict[str, np.ndarray], int, float]:
    """HF weights passed through gguf's numpy quantizer and back; returns (state, bytes, bits/param)."""
    import gguf
    from gguf import quants

    from neox_mlc.hf_checkpoint import TensorIndex, is_buffer

    qtype = getattr(gguf.GGMLQuantizationType, gtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    index = TensorIndex(model_dir)
    state, nbytes, numel = {}, 0, 0
    for name in index.tensors:
        if is_buffer(name):  # the causal mask and friends are not weights (nor counted as parameters)
            continue
        value = index.read(name).astype(np.float32)
        numel += value.size
        if value.ndim == 2 and value.shape[1] % block == 0:
            state[name] = quants.dequantize(quants.quantize(value, qtype), qtype).reshape(value.shape)
            nbytes += value.size // block * type_size
        else:
            state[name] = value
            nbytes += value.size * 2
    return state, nbytes, nbytes * 8 / numel


def prompt_ids(tok: Any, template: dict[str, Any], prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt in the conversation template, as token ids (what every engine is asked)."""
    from neox_mlc.chat import format_prompt

    return [tok.encode(format_prompt(template, [], p), add_special_tokens=False).ids for p in prompts]


def side_by_side(tok: Any, template: dict[str, Any], prompts: Sequence[str], test: Any, reference: Any) -> list[dict[str, str]]:
    """Greedy answers of the quantized model (``bundle``) and the reference to the same template prompts."""
    answers = []
    for p, ids in zip(prompts, prompt_ids(tok, template, prompts), strict=True):
        answers.append({"prompt": p, "bundle": tok.decode(test(ids)), "reference": tok.decode(reference(ids))})
    return answers


def evaluate_gguf(
    model_dir: Path, tokenizer: Path, gtype: str, text: str, window: int, max_tokens: int,
    template: dict[str, Any] | None = None, prompts: Sequence[str] = (), answer_tokens: int = 24,
) -> dict[str, Any]:  # fmt: skip
    from tokenizers import Tokenizer

    from neox_mlc.reference import hf_logits, load_hf_model

    tok = Tokenizer.from_file(str(tokenizer))
    windows = eval_windows(text_ids(tok, text), window, max_tokens)
    ref = load_hf_model(model_dir)
    state, nbytes, bits = gguf_dequantized_state(model_dir, gtype)
    test = load_hf_model(model_dir, state)
    result = {
        "method": f"gguf {gtype} (numpy)", "quantization": gtype, "bits_per_param": bits, "params_bytes_on_disk": nbytes,
        **compare_windows(lambda w: hf_logits(ref, w), lambda w: hf_logits(test, w), windows),
    }  # fmt: skip
    if template is not None:
        from neox_mlc.gen_config import conv_template

        # the config's template data expanded as gen_config writes it into the chat config
        template = conv_template("evaluation", template, int(ref.config.bos_token_id or 0))
        stop = set(template["stop_token_ids"]) | {piece_id(tok, "</s>")}
        result["answers"] = side_by_side(tok, template, prompts, lambda ids: greedy_hf(test, ids, answer_tokens, stop),
                                         lambda ids: greedy_hf(ref, ids, answer_tokens, stop))  # fmt: skip
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", help="original HF checkpoint (the reference)")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json (the workflow's tokenizer step)")
    ap.add_argument("--params", help="bundle params directory (tensor-cache.json)")
    ap.add_argument("--lib", help="host (llvm) model library")
    ap.add_argument("--chat-config")
    ap.add_argument("--gguf-type", choices=GGUF_PEER_TYPES, help="evaluate a gguf peer instead of a bundle")
    # llama.cpp's own inference as a peer row (#15; neox_mlc/llamacpp.py, needs the optional llama-cpp-python)
    ap.add_argument("--llama-cpp-type", choices=list(LLAMA_CPP_TYPES), help="evaluate llama.cpp itself on its GGUF of this type")
    ap.add_argument("--window", type=int, default=256, help="evaluation window for gguf peers (bundles use their context window)")
    ap.add_argument("--text")
    ap.add_argument("--hf-dataset")
    ap.add_argument("--split")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--prompt", action="append", default=[])
    ap.add_argument("--conv-template-json", help="the conversation template (gguf and llama.cpp peers: for the greedy answers)")
    ap.add_argument("--unigram-train", help="write the unigram baseline from this training text instead of evaluating a model")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    text = load_text(a.text, a.hf_dataset, a.split)
    model_dir = Path(a.model_dir)
    prompts = a.prompt or DEFAULT_PROMPTS
    if a.unigram_train:
        from tokenizers import Tokenizer

        train = load_text(a.unigram_train, None, None)
        result = unigram_baseline(Tokenizer.from_file(a.tokenizer), train, text, a.window, a.max_tokens)
    elif a.llama_cpp_type:
        from neox_mlc.llamacpp import evaluate_llama_cpp

        template = json.loads(a.conv_template_json) if a.conv_template_json else None
        result = evaluate_llama_cpp(model_dir, Path(a.tokenizer), a.llama_cpp_type, text, a.window, a.max_tokens, template, prompts)
    elif a.gguf_type:
        template = json.loads(a.conv_template_json) if a.conv_template_json else None
        result = evaluate_gguf(model_dir, Path(a.tokenizer), a.gguf_type, text, a.window, a.max_tokens, template, prompts)
    else:
        if not (a.params and a.lib and a.chat_config):
            raise WorkflowError("bundle evaluation needs --params, --lib and --chat-config")
        result = evaluate_bundle(
            model_dir, Path(a.tokenizer), Path(a.params), Path(a.lib), Path(a.chat_config), text, a.max_tokens, prompts
        )
    result["peak_rss_gib"] = peak_rss_gib()
    write_json(a.output, result)
    return 0


if __name__ == "__main__":
    run_cli(main)
