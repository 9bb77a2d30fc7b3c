"""``convert_weight``: Hugging Face GPT-NeoX checkpoint → MLC tensor cache, one tensor at a time.

Mirrors ``mlc_llm convert_weight MODEL --quantization Q -o OUT``. The conversion is split in three
steps so that a workflow can declare every file it writes and rerun only what is stale:

1. ``--plan-only PLAN``: from config.json and the weight files' headers, list every MLC parameter
   (name, shape, dtype, source tensor) and assign it to a shard (no tensor data is read);
2. ``--shard N --plan PLAN``: read, transform and quantize the tensors of shard N, write it atomically;
3. ``--index --plan PLAN``: verify all shards and write ``tensor-cache.json`` last.

Without those flags the three steps run in one process into a temporary directory that is renamed
onto ``-o`` when complete. Parameter order follows the source files (file order, then tensor names
sorted), each quantized weight emitting ``q_weight`` then ``q_scale`` — the order MLC-LLM produces.
Peak memory: one source tensor plus its quantization temporaries, processed in row blocks.
"""

from __future__ import annotations

import argparse
import re
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neox_mlc.common import (
    WorkflowError,
    atomic_path,
    check_apart,
    check_free_space,
    check_output,
    md5_file,
    read_json,
    run_cli,
    run_mlc_llm,
    usable_cpus,
    write_json,
)
from neox_mlc.hf_checkpoint import NeoXArch, TensorIndex, is_buffer, load_arch
from neox_mlc.quantization import QUANTIZATIONS, Quantization, get_quantization, quantize_fast
from neox_mlc.tensor_cache import DEFAULT_SHARD_CAP_MB, ShardPlan, encode, plan_shards, verify_cache, write_index, write_shard

_ROW_BLOCK_ELEMS = 1 << 20  # ~1 M elements per block: temporaries stay in cache, memory stays bounded
STEP = "convert_weight"  # marks the params folders this step publishes (see common.atomic_path)


@dataclass(frozen=True)
class ParamSpec:
    """One MLC parameter and how to make it from one source tensor."""

    name: str
    shape: list[int]
    dtype: str
    source: str
    part: str  # "full", "q_weight" or "q_scale"
    source_numel: int  # counted once per source tensor for BitsPerParam (0 on the q_scale entry)


def declared_params(arch: NeoXArch, quant: Quantization) -> dict[str, tuple[tuple[int, ...], str]]:
    """MLC name -> (shape, dtype) of every parameter the model library declares for this checkpoint.

    Why from the model: the library reads exactly these parameters, so the conversion plan is
    derived from them (as MLC's loader is from its model) instead of from a second hand-kept list.
    """
    from tvm.target import Target

    from neox_mlc.gpt_neox_model import GPTNeoXForCausalLM

    cfg = arch.model_config(arch.max_position_embeddings, arch.max_position_embeddings, 1)
    model = GPTNeoXForCausalLM(cfg, quant, Target("llvm"))
    return {name: (tuple(int(d) for d in p.shape), str(p.dtype)) for name, p in model.named_parameters()}


def _encoded(name: str) -> tuple[str, str]:
    """The weight an MLC parameter encodes (its unquantized name) and which part it is of it."""
    for part in ("q_weight", "q_scale"):
        if name.endswith("." + part):
            return name.removesuffix("." + part) + ".weight", part
    return name, "full"


def _source(weight: str, arch: NeoXArch) -> str:
    """The HF tensor a weight is read from: a tied checkpoint's output head is its embedding
    (MLC's GPT-NeoX always has a head of its own)."""
    if weight == "embed_out.weight" and arch.tie_word_embeddings:
        return "gpt_neox.embed_in.weight"
    return weight


_LAYER_RE = re.compile(r"^gpt_neox\.layers\.(\d+)\.")


def check_no_extra_layers(arch: NeoXArch, index: TensorIndex) -> None:
    """A checkpoint with more layers than its config.json would convert into a model missing them.

    Why: the library is built from config.json, so the extra layers would silently be dropped and
    the bundle would answer differently from the checkpoint, with no error anywhere.
    """
    for name in index.tensors:
        match = _LAYER_RE.match(name)
        if match and int(match.group(1)) >= arch.num_hidden_layers:
            raise WorkflowError(
                f"tensor {name} belongs to layer {match.group(1)}, but config.json num_hidden_layers is "
                f"{arch.num_hidden_layers}; the checkpoint has more layers than its config"
            )


def plan_params(arch: NeoXArch, index: TensorIndex, quant: Quantization) -> list[ParamSpec]:
    """The model's parameters, each with its source tensor, in MLC's order (source file, then name).

    Each source tensor's shape must be the one the model declares for this config.json (for a
    quantized pair: the unquantized model's weight), checked from the headers alone.
    """
    declared = declared_params(arch, quant)
    logical = declared if quant.kind != "group-quant" else declared_params(arch, get_quantization("q0f32"))
    parts: dict[str, list[str]] = {}  # weight -> the MLC parameters encoding it, in declaration order
    for name in declared:
        parts.setdefault(_encoded(name)[0], []).append(name)
    missing = sorted({_source(w, arch) for w in parts} - set(index.tensors))
    if missing:
        files = ", ".join(p.name for p in index.files)
        raise WorkflowError(f"checkpoint is missing tensor {missing[0]} ({len(missing)} missing) in {files}")
    check_no_extra_layers(arch, index)
    ordered: list[str] = []
    for path in index.files:
        # a tied head stored anyway (embed_out.weight beside the embedding) keeps the tied head's place
        ordered += sorted(n for n, info in index.tensors.items() if info.file == path and n in parts and _source(n, arch) == n)
    ordered += [w for w in parts if w not in ordered]  # a tied head, read from the embedding
    specs: list[ParamSpec] = []
    for weight in ordered:
        src = _source(weight, arch)
        found = tuple(index.tensors[src].shape)
        if found != logical[weight][0]:
            raise WorkflowError(f"tensor {src} has shape {list(found)}, but config.json implies {list(logical[weight][0])}")
        numel = int(np.prod(found))
        for name in parts[weight]:
            shape, dtype = declared[name]
            part = _encoded(name)[1]
            specs.append(ParamSpec(name, list(shape), dtype, src, part, 0 if part == "q_scale" else numel))
    return specs


def skipped_tensors(arch: NeoXArch, index: TensorIndex, wanted: set[str]) -> list[str]:
    """The checkpoint's tensors that are not weights MLC needs: known buffers, or a tied head's copy.

    Anything else is a tensor this converter does not know, and converting without it could be
    silently wrong: a one-line error names it.
    """
    skipped = []
    for name in index.tensors:
        if name in wanted:
            continue
        if is_buffer(name) or (arch.tie_word_embeddings and name == "embed_out.weight"):
            skipped.append(name)
            continue
        raise WorkflowError(
            f"checkpoint tensor {name} is neither a GPT-NeoX weight nor a known buffer "
            "(attention.bias, attention.masked_bias, rotary_emb.inv_freq); refusing to convert without it"
        )
    return skipped


def describe_skipped(names: list[str]) -> str:
    """One log line: how many of each kind of tensor were skipped, with an example name."""
    kinds: dict[str, list[str]] = {}
    for name in names:
        kinds.setdefault(re.sub(r"\.\d+\.", ".N.", name), []).append(name)
    parts = [f"{len(v)} x {k}" + (" (tied to gpt_neox.embed_in.weight)" if k == "embed_out.weight" else "") for k, v in kinds.items()]
    return f"skipped {len(names)} non-weight tensor(s): " + ", ".join(parts) if names else "skipped no tensors"


def metadata_for(specs: list[ParamSpec]) -> dict[str, Any]:
    """MLC's index metadata: tensor count, logical bytes, bits per source parameter."""
    param_bytes = float(sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in specs))
    numel = sum(s.source_numel for s in specs)
    return {"ParamSize": len(specs), "ParamBytes": param_bytes, "BitsPerParam": param_bytes * 8 / numel}


def build_plan(
    model_dir: str | Path,
    quant_name: str,
    shard_cap_mb: int = DEFAULT_SHARD_CAP_MB,
    index: TensorIndex | None = None,
    allow_non_finite: bool = False,
) -> dict[str, Any]:
    """Everything needed to write the cache, as JSON-able data (``index`` is reused when given).

    ``allow_non_finite`` travels in the plan so that the per-shard jobs honour the same choice.
    """
    quant = get_quantization(quant_name)
    arch, _ = load_arch(model_dir)
    index = index or TensorIndex(model_dir)
    specs = plan_params(arch, index, quant)
    skipped = skipped_tensors(arch, index, {s.source for s in specs})
    shards = plan_shards([(s.name, s.shape, s.dtype) for s in specs], shard_cap_mb)
    return {
        "model_dir": str(Path(model_dir)),
        "quantization": quant.name,
        "num_attention_heads": arch.num_attention_heads,
        "params": [asdict(s) for s in specs],
        "shards": [{"dataPath": s.data_path, "records": s.records} for s in shards],
        "metadata": metadata_for(specs),
        "allow_non_finite": allow_non_finite,
        "skipped": skipped,
    }


def check_finite(name: str, value: np.ndarray) -> None:
    """Stop on NaN or ±Inf in a source tensor, naming it and how many values are bad.

    Why: quantization turns one NaN into a NaN scale for its whole group, and the bundle then
    answers garbage without a word; counted in row blocks so no full-size mask is allocated.
    """
    if value.dtype.kind != "f":
        return
    flat = value.reshape(-1)
    bad = sum(int(np.count_nonzero(~np.isfinite(flat[i : i + _ROW_BLOCK_ELEMS]))) for i in range(0, flat.size, _ROW_BLOCK_ELEMS))
    if bad:
        raise WorkflowError(
            f"tensor {name} has {bad} non-finite value(s) (NaN or Inf) of {flat.size}; "
            "fix the checkpoint, or pass --allow-non-finite to convert it anyway"
        )


def _reorder_qkv(value: np.ndarray, heads: int) -> np.ndarray:
    """HF stores fused QKV rows per head ``[heads, 3, head_dim]``; MLC wants ``[3, heads, head_dim]``."""
    rows = value.shape[0]
    rest = value.shape[1:]
    return value.reshape(heads, 3, rows // (3 * heads), *rest).swapaxes(0, 1).reshape(value.shape)


def default_threads() -> int:
    """Up to 4 quantizer threads, never more than the CPUs this process may use."""
    return min(4, usable_cpus())


def _quantize_blocked(weight: np.ndarray, quant: Quantization, pool: ThreadPoolExecutor) -> tuple[np.ndarray, np.ndarray]:
    """Quantize row blocks on the converter's thread pool (numpy and torch release the GIL in these loops).

    Each block runs single-threaded inside (torch's own intra-op threads would oversubscribe the
    pool), so the pool's width is the parallelism.
    """
    _single_threaded_torch()
    rows, k = weight.shape
    step = max(1, _ROW_BLOCK_ELEMS // max(k, 1))
    parts = list(pool.map(lambda i: quantize_fast(weight[i : i + step], quant), range(0, rows, step)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _single_threaded_torch() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


class _Converter:
    """Turns source tensors into MLC tensors, caching a quantized pair between its two records."""

    def __init__(self, plan: dict[str, Any], index: TensorIndex, threads: int | None = None) -> None:
        if threads is not None and threads < 1:
            raise WorkflowError(f"threads {threads} is out of range; allowed: 1 or more")
        self.pool = ThreadPoolExecutor(max_workers=threads or default_threads())
        self.quant = get_quantization(plan["quantization"])
        self.heads = plan["num_attention_heads"]
        self.index = index
        self.specs = {p["name"]: ParamSpec(**p) for p in plan["params"]}
        self.allow_non_finite = bool(plan.get("allow_non_finite", False))
        self._pair: tuple[str, np.ndarray, np.ndarray] | None = None

    def tensor(self, name: str) -> np.ndarray:
        spec = self.specs[name]
        if spec.part == "full":
            return self._source(spec.source).astype(spec.dtype, copy=False)
        base = name.rsplit(".", 1)[0]  # the pair's MLC name: a tied head shares its source with embed_in
        if self._pair is None or self._pair[0] != base:
            weight = self._source(spec.source).astype(self.quant.model_dtype, copy=False)
            q_weight, q_scale = _quantize_blocked(weight, self.quant, self.pool)
            if self.quant.stores_transposed(base):
                q_weight, q_scale = q_weight.T, q_scale.T
            self._pair = (base, q_weight, q_scale)
        out = self._pair[1] if spec.part == "q_weight" else self._pair[2]
        if list(out.shape) != spec.shape:
            raise WorkflowError(f"{name}: produced shape {list(out.shape)}, plan says {spec.shape}")
        return out

    def _source(self, name: str) -> np.ndarray:
        value = self.index.read(name)
        if not self.allow_non_finite:
            check_finite(name, value)
        if ".attention.query_key_value." in name:
            value = _reorder_qkv(value, self.heads)
        return value


def encode_shard(plan: dict[str, Any], shard_id: int, conv: _Converter) -> list[memoryview]:
    """The bytes of shard ``shard_id``, tensor by tensor, in plan order."""
    return [encode(np.ascontiguousarray(conv.tensor(rec["name"]))) for rec in _shard(plan, shard_id)["records"]]


def _shard(plan: dict[str, Any], shard_id: int) -> dict[str, Any]:
    if not 0 <= shard_id < len(plan["shards"]):
        raise WorkflowError(f"shard {shard_id} out of range; the plan has {len(plan['shards'])} shards")
    return plan["shards"][shard_id]


def _shard_target(plan: dict[str, Any], shard_id: int, out_dir: str | Path) -> tuple[Path, int]:
    shard = _shard(plan, shard_id)
    return Path(out_dir) / shard["dataPath"], sum(r["nbytes"] for r in shard["records"])


def convert_shard(
    plan: dict[str, Any], shard_id: int, out_dir: str | Path, index: TensorIndex | None = None, threads: int | None = None
) -> str:
    """Write ``params_shard_<shard_id>.bin`` of ``plan`` into ``out_dir``; return its md5."""
    path, expected = _shard_target(plan, shard_id, out_dir)
    if plan.get("external"):
        _copy_external(plan, path.name, out_dir)
        return md5_file(path)
    check_free_space(out_dir, expected, f"shard {shard_id}")
    chunks = encode_shard(plan, shard_id, _Converter(plan, index or TensorIndex(plan["model_dir"]), threads))
    return write_shard(path, chunks, expected)


def planned_bytes(plan: dict[str, Any]) -> int:
    return sum(r["nbytes"] for s in plan["shards"] for r in s["records"])


def _shard_plans(plan: dict[str, Any]) -> list[ShardPlan]:
    return [ShardPlan(s["dataPath"], s["records"]) for s in plan["shards"]]


def write_plan_index(plan: dict[str, Any], out_dir: str | Path, md5s: dict[str, str] | None = None) -> None:
    if plan.get("external"):
        for name in ("tensor-cache-b16.json", "tensor-cache.json"):
            if (Path(plan["external"]) / name).is_file():
                _copy_external(plan, name, out_dir)
        verify_cache(out_dir, check_md5=True)
        return
    write_index(out_dir, _shard_plans(plan), plan["metadata"], md5s)


def _convert_pipelined(plan: dict[str, Any], out_dir: Path, index: TensorIndex, threads: int | None) -> dict[str, str]:
    """Compute shard i+1 while shard i is written and hashed: at most two shards in memory."""
    conv = _Converter(plan, index, threads)
    md5s: dict[str, str] = {}

    def finish(name: str, written: Any, sources: list[str]) -> None:
        md5s[name] = written.result()
        index.release(sources)

    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for i, shard in enumerate(plan["shards"]):
            chunks = encode_shard(plan, i, conv)
            if pending is not None:
                finish(*pending)
            path, expected = _shard_target(plan, i, out_dir)
            sources = [conv.specs[r["name"]].source for r in shard["records"]]
            pending = (shard["dataPath"], writer.submit(write_shard, path, chunks, expected), sources)
        if pending is not None:
            finish(*pending)
    return md5s


def convert(
    model_dir: str | Path,
    quant_name: str,
    out_dir: str | Path,
    shard_cap_mb: int = DEFAULT_SHARD_CAP_MB,
    threads: int | None = None,
    allow_non_finite: bool = False,
) -> dict[str, Any]:
    """The whole conversion in one process, published atomically into ``out_dir``."""
    check_output(out_dir, STEP, [model_dir])
    index = TensorIndex(model_dir)
    plan = build_plan(model_dir, quant_name, shard_cap_mb, index, allow_non_finite)
    check_free_space(Path(out_dir).parent, planned_bytes(plan), f"{quant_name} params")
    with atomic_path(out_dir, STEP, [model_dir]) as tmp:
        tmp.mkdir(parents=True)
        md5s = _convert_pipelined(plan, tmp, index, threads)
        write_plan_index(plan, tmp, md5s)
    return plan


def plan_from_mlc_llm(model_dir: str | Path, quant_name: str, staging: str | Path) -> dict[str, Any]:
    """``backend: mlc_llm``: run the real converter into ``staging``; the plan then lists its shards.

    The shard and index steps copy MLC's files into place instead of converting, so the workflow's
    graph (and its rerun behaviour) is the same for both backends.
    """
    with atomic_path(staging, "convert_weight (mlc_llm)", [model_dir]) as tmp:
        run_mlc_llm(mlc_llm_argv(str(model_dir), quant_name, str(tmp)))
        index = verify_cache(tmp, check_md5=True)
    return {
        "model_dir": str(Path(model_dir)),
        "quantization": quant_name,
        "external": str(staging),
        "params": [],
        "shards": [{"dataPath": s["dataPath"], "records": s["records"]} for s in index["records"]],
        "metadata": index["metadata"],
    }


def _copy_external(plan: dict[str, Any], name: str, out_dir: str | Path) -> None:
    src = Path(plan["external"]) / name
    if not src.is_file():
        raise WorkflowError(f"{src} written by mlc_llm convert_weight is missing; rerun the weight_plan step")
    with atomic_path(Path(out_dir) / name) as tmp:
        shutil.copyfile(src, tmp)


def mlc_llm_argv(model_dir: str, quant: str, out_dir: str, device: str = "cpu") -> list[str]:
    """The real MLC-LLM CLI call, for users who have it (``backend: mlc_llm``)."""
    return ["mlc_llm", "convert_weight", str(model_dir), "--quantization", quant, "--device", device, "-o", str(out_dir)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="model directory holding config.json and weights")
    ap.add_argument("--quantization", required=True, help=f"one of {', '.join(QUANTIZATIONS)}")
    ap.add_argument("-o", "--output", required=True, help="output params directory")
    ap.add_argument("--device", default="cpu", help="accepted for mlc_llm compatibility; conversion runs on CPU")
    ap.add_argument("--shard-cap-mb", type=int, default=DEFAULT_SHARD_CAP_MB)
    ap.add_argument("--threads", type=int, help="quantizer threads (default: up to 4, within the usable CPUs)")
    step = ap.add_mutually_exclusive_group()
    step.add_argument("--plan-only", metavar="PLAN", help="only write the conversion plan JSON")
    step.add_argument("--shard", type=int, metavar="N", help="only write shard N (needs --plan)")
    step.add_argument("--index", action="store_true", help="only verify shards and write the index (needs --plan)")
    ap.add_argument("--plan", help="plan JSON written by --plan-only")
    ap.add_argument("--allow-non-finite", action="store_true", help="convert tensors holding NaN/Inf instead of stopping")
    ap.add_argument("--backend", choices=["native", "mlc_llm"], default="native", help="mlc_llm: run the real MLC-LLM converter")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    get_quantization(args.quantization)
    check_apart(args.output, [args.config])
    if args.plan_only:
        check_apart(args.plan_only, [args.config])
    if args.plan_only:
        if args.backend == "mlc_llm":
            plan = plan_from_mlc_llm(args.config, args.quantization, Path(args.plan_only).with_name("mlc_llm-params"))
        else:
            plan = build_plan(args.config, args.quantization, args.shard_cap_mb, allow_non_finite=args.allow_non_finite)
            print(describe_skipped(plan["skipped"]))
        write_json(args.plan_only, plan)
        return 0
    if args.shard is not None or args.index:
        if not args.plan:
            raise WorkflowError("--shard/--index need --plan PLAN.json from --plan-only")
        plan = read_json(args.plan, "conversion plan")
        if plan["quantization"] != args.quantization:
            raise WorkflowError(f"plan is for {plan['quantization']}, not {args.quantization}")
        if args.index:
            write_plan_index(plan, args.output)
        else:
            convert_shard(plan, args.shard, args.output, threads=args.threads)
        return 0
    plan = convert(args.config, args.quantization, args.output, args.shard_cap_mb, args.threads, args.allow_non_finite)
    print(describe_skipped(plan["skipped"]))
    print(f"wrote {len(plan['shards'])} shard(s), {len(plan['params'])} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
