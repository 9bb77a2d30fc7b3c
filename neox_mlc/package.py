"""Package a bundle: the two app configs, then ``dist/<model>-<quant>/`` with its MANIFEST.

Two verbs, two artifacts (each its own workflow rule):

* ``app-config``: ``app-config.json`` in the seed app's form (``model_libs``, ``model_list`` of
  ``{model_url, local_id}``, ``add_model_samples``) and ``mlc-app-config.json`` in the form today's
  MLC iOS app reads (``model_list`` of ``{model_id, model_lib, model_path | model_url,
  estimated_vram_bytes}``). The VRAM estimate is computed from the tensor cache and the chat config:
  parameters as loaded (``ParamBytes``), the KV cache for the full context window, and the prefill
  activations/logits (see :func:`estimate_vram_bytes`).
* ``bundle``: copies (hard-links) params, chat config, tokenizer files, libraries and app configs into
  the bundle directory and writes ``MANIFEST.json`` with size and sha256 of every file plus
  provenance, all inside a temporary directory renamed into place when complete.

Bundle layout (what the app consumes)::

    dist/<id>/app-config.json            seed app
    dist/<id>/bundle/mlc-app-config.json  today's app; model_path "<id>" is relative to bundle/
    dist/<id>/bundle/<id>/                params_shard_*.bin, tensor-cache.json, mlc-chat-config.json, tokenizer
    dist/<id>/lib/<id>-<target>.<ext>     model library per target
    dist/<id>/MANIFEST.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from neox_mlc.common import WorkflowError, atomic_path, check_output, read_json, run_cli, sha256_file, write_json
from neox_mlc.tensor_cache import verify_cache

_DTYPE_BYTES = {"float16": 2, "float32": 4}
TOOL_PACKAGES = ("apache-tvm", "numpy", "safetensors", "tokenizers", "transformers", "huggingface_hub", "snakemake", "torch")


def estimate_vram_bytes(tensor_cache: dict[str, Any], chat_config: dict[str, Any]) -> int:
    """Parameters + KV cache (full context, batch 1) + prefill activations and logits.

    KV cache: ``2 (K and V) × layers × context_window × hidden × dtype``. Activations: one prefill chunk
    of the widest intermediate tensors (QKV ``3h``, MLP ``4h``-sized ``intermediate``, residual ``h``)
    in the model dtype, plus float32 logits for the chunk's last position per sequence.
    """
    mc = chat_config["model_config"]
    dtype_bytes = _DTYPE_BYTES["float32" if "f32" in chat_config["quantization"] else "float16"]
    params = int(tensor_cache["metadata"]["ParamBytes"])
    kv = 2 * mc["num_hidden_layers"] * chat_config["context_window_size"] * mc["hidden_size"] * dtype_bytes
    chunk = chat_config["prefill_chunk_size"]
    activations = chunk * (4 * mc["hidden_size"] + mc["intermediate_size"]) * dtype_bytes
    logits = chat_config["vocab_size"] * 4 * mc.get("max_batch_size", 1)
    return params + kv + activations + logits


def app_configs(
    model_id: str, model_lib: str, model_url: str | None, tensor_cache: dict[str, Any], chat_config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The seed app's and today's app's config for one bundle."""
    seed = {
        "model_libs": [model_id],
        "model_list": [{"model_url": model_url or "", "local_id": model_id}],
        "add_model_samples": [],
    }
    entry: dict[str, Any] = {"model_id": model_id, "model_lib": model_lib, "model_path": model_id}
    if model_url:
        entry["model_url"] = model_url
    entry["estimated_vram_bytes"] = estimate_vram_bytes(tensor_cache, chat_config)
    return seed, {"model_list": [entry]}


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in TOOL_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make_bundle(
    out: Path,
    model_id: str,
    params: Path,
    chat_config: Path,
    tokenizer: Path,
    libs: list[Path],
    app_config: Path,
    mlc_app_config: Path,
    snapshot: Path,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """Assemble the bundle atomically and return its manifest."""
    inputs = [params, chat_config, tokenizer, *libs, app_config, mlc_app_config, snapshot]
    check_output(out, "package", inputs)
    index = verify_cache(params, check_md5=True)
    cfg = read_json(chat_config, "chat config")
    with atomic_path(out, "package", inputs) as tmp:
        model_dir = tmp / "bundle" / model_id
        _place(params / "tensor-cache.json", model_dir / "tensor-cache.json")
        if (params / "tensor-cache-b16.json").is_file():
            _place(params / "tensor-cache-b16.json", model_dir / "tensor-cache-b16.json")
        for shard in index["records"]:
            _place(params / shard["dataPath"], model_dir / shard["dataPath"])
        _place(chat_config, model_dir / "mlc-chat-config.json")
        for name in cfg["tokenizer_files"]:
            if not (tokenizer / name).is_file():
                raise WorkflowError(f"tokenizer file {name} listed in the chat config is missing from {tokenizer}")
            _place(tokenizer / name, model_dir / name)
        for lib in libs:
            _place(lib, tmp / "lib" / lib.name)
        _place(app_config, tmp / "app-config.json")
        _place(mlc_app_config, tmp / "bundle" / "mlc-app-config.json")
        snap = read_json(snapshot, "snapshot record")
        files = {
            str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "bundle": model_id,
            "provenance": {
                **provenance,
                "source": snap["source"],
                "revision": snap["revision"],
                "resolved_revision": snap["resolved_revision"],
                "source_files": snap["files"],
            },
            "tools": tool_versions(),
            "files": files,
        }
        write_json(tmp / "MANIFEST.json", manifest)
    return manifest


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    a = sub.add_parser("app-config")
    a.add_argument("--model-id", required=True)
    a.add_argument("--model-lib", required=True)
    a.add_argument("--model-url")
    a.add_argument("--params", required=True, help="params directory (tensor-cache.json)")
    a.add_argument("--chat-config", required=True)
    a.add_argument("--seed-out", required=True)
    a.add_argument("--mlc-out", required=True)
    b = sub.add_parser("bundle")
    b.add_argument("--model-id", required=True)
    b.add_argument("--params", required=True)
    b.add_argument("--chat-config", required=True)
    b.add_argument("--tokenizer", required=True)
    b.add_argument("--lib", action="append", default=[])
    b.add_argument("--app-config", required=True)
    b.add_argument("--mlc-app-config", required=True)
    b.add_argument("--snapshot", required=True)
    b.add_argument("--model", required=True)
    b.add_argument("--target", action="append", default=[])
    b.add_argument("-o", "--output", required=True)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.verb == "app-config":
        cache = verify_cache(a.params)
        cfg = read_json(a.chat_config, "chat config")
        seed, mlc = app_configs(a.model_id, a.model_lib, a.model_url, cache, cfg)
        for out in (a.seed_out, a.mlc_out):
            check_output(out, None, [a.params, a.chat_config])
        write_json(a.seed_out, seed)
        write_json(a.mlc_out, mlc)
        return 0
    # quantization and context window as the chat config fixed them (one route per fact)
    cfg = read_json(a.chat_config, "chat config")
    provenance = {"model": a.model, "quantization": cfg["quantization"], "max_seq_len": cfg["context_window_size"], "targets": a.target}
    make_bundle(
        Path(a.output), a.model_id, Path(a.params), Path(a.chat_config), Path(a.tokenizer),
        [Path(p) for p in a.lib], Path(a.app_config), Path(a.mlc_app_config), Path(a.snapshot), provenance,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
