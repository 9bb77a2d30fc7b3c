"""llama.cpp as a peer: GGUF written from the same checkpoint, and llama.cpp's own speed and logits.

Why a module of its own: the benchmarks and the quality report put this project beside llama.cpp,
measured on the same machine, the same checkpoint and the same token ids. llama.cpp's own
``convert_hf_to_gguf.py`` (llama-cpp-python 0.3.36) fails on GPT-NeoX under transformers 5
(``KeyError: 'rotary_pct'``), so :func:`write_gguf` writes the F16 GGUF with the ``gguf`` package,
doing what that converter's ``GPTNeoXModel`` does (same tensor names and hyper-parameters, and the
same regrouping of the fused QKV from per-head ``[q k v]`` to ``[all q, all k, all v]``); Q4_0 and
Q8_0 then come from llama.cpp's own quantizer (which keeps the output head in Q6_K for Q4_0, as
its files do). The GGUF carries no vocabulary (``tokenizer.ggml.model = "none"``): every
measurement feeds token ids.

``llama-cpp-python`` is an optional extra: it compiles llama.cpp from source (10–40 min), so it
lives in its own virtual environment (``LLAMA_PYTHON``, default ``/work/llamavenv/bin/python``)
and the child entry points here (``python -m neox_mlc.llamacpp speed|logits|quantize``) import
nothing but the standard library, numpy and ``llama_cpp``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_REPO = Path(__file__).resolve().parent.parent
DEFAULT_PYTHON = "/work/llamavenv/bin/python"
FTYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2}  # llama_ftype values (llama.h)


def llama_python() -> str | None:
    """The interpreter that has ``llama_cpp``, or None when the optional extra is not installed."""
    import subprocess

    exe = os.environ.get("LLAMA_PYTHON", DEFAULT_PYTHON)
    if not Path(exe).is_file():
        return None
    ok = subprocess.run([exe, "-c", "import llama_cpp"], capture_output=True, check=False).returncode == 0
    return exe if ok else None


def _regroup_qkv(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's fused QKV rows are per head ``[q k v]``; llama.cpp's are ``[all q, all k, all v]``."""
    rows = w.reshape(heads, 3, -1, *w.shape[1:])
    return np.concatenate([rows[:, i].reshape(-1, *w.shape[1:]) for i in range(3)], axis=0)


def _gguf_names(layers: int) -> dict[str, str]:
    """HF GPT-NeoX tensor name → llama.cpp's (``gguf.TensorNameMap`` for MODEL_ARCH.GPTNEOX)."""
    names = {"gpt_neox.embed_in.weight": "token_embd.weight", "embed_out.weight": "output.weight"}
    for part in ("weight", "bias"):
        names[f"gpt_neox.final_layer_norm.{part}"] = f"output_norm.{part}"
        for i in range(layers):
            hf, gg = f"gpt_neox.layers.{i}.", f"blk.{i}."
            for src, dst in (
                ("input_layernorm", "attn_norm"), ("attention.query_key_value", "attn_qkv"), ("attention.dense", "attn_output"),
                ("post_attention_layernorm", "ffn_norm"), ("mlp.dense_h_to_4h", "ffn_up"), ("mlp.dense_4h_to_h", "ffn_down"),
            ):
                names[hf + f"{src}.{part}"] = gg + f"{dst}.{part}"
    return names


def write_gguf(model_dir: str | Path, out: str | Path) -> Path:
    """F16 GGUF of a GPT-NeoX checkpoint (1-D tensors float32, as llama.cpp's converter writes them)."""
    import gguf

    from neox_mlc.common import atomic_path
    from neox_mlc.hf_checkpoint import TensorIndex, load_arch

    arch, _ = load_arch(model_dir)
    index = TensorIndex(model_dir)
    names = _gguf_names(arch.num_hidden_layers)
    # llama.cpp's GPT-NeoX graph requires output.weight (0.3.36: "tensor 'output.weight' not found"):
    # a tied checkpoint's head is its embedding, written twice, as llama.cpp's own files carry it
    head = "embed_out.weight" if "embed_out.weight" in index else "gpt_neox.embed_in.weight"
    names.pop("embed_out.weight")
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "gptneox")
        w.add_context_length(arch.max_position_embeddings)
        w.add_embedding_length(arch.hidden_size)
        w.add_block_count(arch.num_hidden_layers)
        w.add_feed_forward_length(arch.intermediate_size)
        w.add_rope_dimension_count(int(arch.rotary_pct * arch.head_dim))
        w.add_rope_freq_base(float(arch.rotary_emb_base))
        w.add_head_count(arch.num_attention_heads)
        w.add_parallel_residual(arch.use_parallel_residual)
        w.add_layer_norm_eps(arch.layer_norm_eps)
        w.add_file_type(FTYPES["F16"])
        w.add_tokenizer_model("none")
        w.add_vocab_size(arch.vocab_size)
        for hf, gg in [*names.items(), (head, "output.weight")]:
            t = index.read(hf)
            if "attention.query_key_value" in hf:
                t = _regroup_qkv(t, arch.num_attention_heads)
            t = t.astype(np.float16 if t.ndim == 2 else np.float32)
            w.add_tensor(gg, np.ascontiguousarray(t))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out)


# ---- children: run under the llama.cpp interpreter (stdlib, numpy, llama_cpp only) ----


def _llama_cpp() -> Any:
    """The optional extra, present only in the llama.cpp interpreter."""
    try:
        import llama_cpp
    except ImportError:
        raise RuntimeError(f"llama_cpp is not importable by {sys.executable}: run this under LLAMA_PYTHON") from None
    return llama_cpp


def quantize(src: str, dst: str, ftype: str) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``), as its ``llama-quantize`` tool runs it."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = 2
    tmp = dst + ".tmp"
    if llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype}")
    os.replace(tmp, dst)


def _load(path: str, threads: int, n_ctx: int, all_logits: bool):  # returns llama_cpp.Llama
    return _llama_cpp().Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                           logits_all=all_logits, verbose=False, seed=0)


def _last_logits(llm: Any) -> np.ndarray:
    """The logits of the last evaluated token, straight from llama.cpp.

    Why not ``llm.scores``: llama-cpp-python 0.3.36 fills it only when every position's logits are
    kept (``logits_all``); otherwise it holds zeros, and a "greedy" step would always pick token 0.
    """
    llama_cpp = _llama_cpp()
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def speed(path: str, prompt: int, decode: int, threads: int) -> dict[str, float]:
    """Prefill and greedy decode tokens/s, the same prompt ids as neox_mlc.evaluate.speed."""
    llm = _load(path, threads, prompt + decode + 8, False)
    ids = [5 + (i * 7) % 200 for i in range(prompt)]
    llm.eval(ids[:8])  # warm-up, as the library's own measurement does
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    for _ in range(decode):
        llm.eval([int(np.argmax(_last_logits(llm)))])
    t2 = time.perf_counter()
    return {"prompt_tokens": prompt, "decode_tokens": decode, "prefill_tok_s": prompt / (t1 - t0), "decode_tok_s": decode / (t2 - t1)}


def logits(path: str, windows: Sequence[Sequence[int]], out: str, threads: int) -> None:
    """float32 logits of every position of each window (evaluated independently), concatenated, as .npy."""
    llm = _load(path, threads, max(len(w) for w in windows) + 8, True)
    parts = []
    for w in windows:
        llm.reset()
        llm.eval(list(w))
        # a copy: ``scores`` is llama-cpp-python's one buffer, overwritten by the next window
        parts.append(np.array(llm.scores[: len(w)], dtype=np.float32, copy=True))
    np.save(out, np.concatenate(parts))


def greedy(path: str, prompts: Sequence[Sequence[int]], n: int, stop: Sequence[int], n_ctx: int, threads: int) -> list[list[int]]:
    """Greedy continuations (at most ``n`` tokens, ending before a stop token or the context's end)."""
    llm = _load(path, threads, n_ctx, False)
    outs = []
    for ids in prompts:
        llm.reset()
        llm.eval(list(ids))
        out: list[int] = []
        while len(out) < n:
            t = int(np.argmax(_last_logits(llm)))
            if t in stop or llm.n_tokens >= n_ctx:
                break
            out.append(t)
            llm.eval([t])
        outs.append(out)
    return outs


# ---- the parent: runs in the workflow's interpreter ----


def _child(python: str, *args: str) -> str:
    """One llama.cpp child process; its stderr (llama.cpp's own messages) becomes the error on failure."""
    import subprocess

    from neox_mlc.common import WorkflowError

    proc = subprocess.run([python, "-m", "neox_mlc.llamacpp", *args], cwd=_REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise WorkflowError(f"llama.cpp child {args[0]} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def gguf_summary(path: str | Path, model_dir: str | Path) -> dict[str, Any]:
    """Bits per parameter of a GGUF (its tensor bytes over the checkpoint's parameters) and its tensor types.

    Why tensor bytes and the checkpoint's count: the same measure as the other rows (metadata and
    padding excluded; a tied head that llama.cpp stores twice is counted in the bytes, once in the
    parameters — what a llama.cpp user pays for).
    """
    import gguf

    from neox_mlc.hf_checkpoint import TensorIndex, is_buffer

    reader = gguf.GGUFReader(str(path))
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    numel = sum(int(np.prod(i.shape)) for n, i in TensorIndex(model_dir).tensors.items() if not is_buffer(n))
    return {"bits_per_param": nbytes * 8 / numel, "tensor_bytes": nbytes, "tensor_types": types}


def evaluate_llama_cpp(
    model_dir: str | Path, tokenizer: str | Path, gtype: str, text: str, window: int, max_tokens: int,
    template: dict[str, Any] | None = None, prompts: Sequence[str] = (), answer_tokens: int = 24,
) -> dict[str, Any]:  # fmt: skip
    """A quality-report row from llama.cpp's own inference of its ``gtype`` GGUF (same windows, same reference).

    Why beside the numpy-quantizer rows: those pass weights through gguf's quantizer into
    transformers; these run llama.cpp's kernels (its quantizer keeps the output head at higher
    precision, and its matmuls quantize activations to 8 bits), which is what a llama.cpp user gets.
    The windows are ``neox_mlc.evaluate``'s, so the chunks match the other rows' (pairwise verdicts).
    """
    import tempfile

    from tokenizers import Tokenizer

    from neox_mlc.common import WorkflowError
    from neox_mlc.evaluate import compare_windows, eval_windows, greedy_hf, prompt_ids, side_by_side, text_ids
    from neox_mlc.reference import hf_logits, load_hf_model
    from neox_mlc.spm_tokenizer import piece_id

    if gtype not in FTYPES:
        raise WorkflowError(f"llama.cpp type {gtype!r} is not one of {', '.join(FTYPES)}")
    python = llama_python()
    if python is None:
        raise WorkflowError(f"llama.cpp rows need llama-cpp-python in {os.environ.get('LLAMA_PYTHON', DEFAULT_PYTHON)} (set LLAMA_PYTHON)")
    tok = Tokenizer.from_file(str(tokenizer))
    windows = eval_windows(text_ids(tok, text), window, max_tokens)
    ref = load_hf_model(Path(model_dir))
    with tempfile.TemporaryDirectory() as tmp:
        model = write_gguf(model_dir, Path(tmp) / "F16.gguf")
        if gtype != "F16":
            model = Path(tmp) / f"{gtype}.gguf"
            _child(python, "quantize", str(Path(tmp) / "F16.gguf"), str(model), gtype)
        (Path(tmp) / "ids.json").write_text(json.dumps(windows))
        _child(python, "logits", str(model), str(Path(tmp) / "ids.json"), str(Path(tmp) / "out.npy"))
        flat = np.load(Path(tmp) / "out.npy", mmap_mode="r")
        starts = np.cumsum([0] + [len(w) for w in windows])
        if flat.shape[0] != starts[-1]:
            raise WorkflowError(f"llama.cpp returned {flat.shape[0]} rows of logits for {starts[-1]} positions")

        def llama_fn(w: list[int]) -> np.ndarray:  # windows may repeat: the same ids give the same logits
            i = windows.index(w)
            return np.asarray(flat[starts[i] : starts[i + 1]], dtype=np.float32)

        result = {
            "method": f"llama.cpp {gtype}", "quantization": gtype, **gguf_summary(model, model_dir),
            "params_bytes_on_disk": model.stat().st_size, "engine": f"llama-cpp-python {_child(python, 'version').strip()}",
            **compare_windows(lambda w: hf_logits(ref, w), llama_fn, windows),
        }  # fmt: skip
        if template is not None:
            from neox_mlc.gen_config import conv_template

            template = conv_template("evaluation", template, int(ref.config.bos_token_id or 0))
            stop = sorted(set(template["stop_token_ids"]) | {piece_id(tok, "</s>")})
            asked = prompt_ids(tok, template, prompts)
            n_ctx = max(len(ids) for ids in asked) + answer_tokens + 8
            (Path(tmp) / "prompts.json").write_text(json.dumps(asked))
            got = json.loads(_child(python, "greedy", str(model), str(Path(tmp) / "prompts.json"), str(answer_tokens),
                                    json.dumps(stop), str(n_ctx)))  # fmt: skip
            by_prompt = {tuple(a): g for a, g in zip(asked, got, strict=True)}
            result["answers"] = side_by_side(tok, template, prompts, lambda ids: by_prompt[tuple(ids)],
                                             lambda ids: greedy_hf(ref, ids, answer_tokens, set(stop)))  # fmt: skip
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="llama.cpp children (run with the llama-cpp-python interpreter)")
    sub = ap.add_subparsers(dest="verb", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("ftype", choices=sorted(FTYPES))
    s = sub.add_parser("speed")
    s.add_argument("gguf")
    s.add_argument("--prompt", type=int, default=128)
    s.add_argument("--decode", type=int, default=64)
    s.add_argument("--threads", type=int, default=2)
    lg = sub.add_parser("logits")
    lg.add_argument("gguf")
    lg.add_argument("ids", help="JSON file with a list of windows (lists of token ids)")
    lg.add_argument("out")
    lg.add_argument("--threads", type=int, default=2)
    g = sub.add_parser("greedy")
    g.add_argument("gguf")
    g.add_argument("prompts", help="JSON file with a list of prompts (lists of token ids)")
    g.add_argument("n", type=int)
    g.add_argument("stop", help="JSON list of stop token ids")
    g.add_argument("n_ctx", type=int)
    g.add_argument("--threads", type=int, default=2)
    sub.add_parser("version")
    a = ap.parse_args(argv)
    if a.verb == "quantize":
        quantize(a.src, a.dst, a.ftype)
    elif a.verb == "speed":
        print(json.dumps(speed(a.gguf, a.prompt, a.decode, a.threads)))
    elif a.verb == "greedy":
        print(json.dumps(greedy(a.gguf, json.loads(Path(a.prompts).read_text()), a.n, json.loads(a.stop), a.n_ctx, a.threads)))
    elif a.verb == "version":
        print(_llama_cpp().__version__)
    else:
        logits(a.gguf, json.loads(Path(a.ids).read_text()), a.out, a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
