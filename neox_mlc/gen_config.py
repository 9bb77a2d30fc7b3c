"""``gen_config``: write ``mlc-chat-config.json`` for a GPT-NeoX checkpoint, as MLC-LLM's verb does.

Mirrors ``mlc_llm gen_config MODEL --quantization Q --conv-template T --context-window-size N -o OUT``.
Every architecture field is read from the Hugging Face config (never hard-coded for one size); the
conversation template comes from data (``conv_templates`` in config.yaml) and is expanded here into
MLC's full ``conv_template`` object. ``add_bos`` has no field of its own in MLC's schema: it becomes
``system_prefix_token_ids`` (``[bos]`` or ``null``). One deliberate difference from MLC's verb: the
checkpoint's ``eos_token_id`` joins the template's ``stop_token_ids`` (LINE's template stops on
``[3, 0]`` but the model ends a reply with ``</s>``, id 2, and the runtime stops on the ids the
chat config lists, so without it a reply would run on to the token limit). With ``--no-eos-stop`` the output is JSON-equal to what MLC-LLM wrote for the reference
fixtures (tests/test_conformance.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from neox_mlc.common import REPO_ROOT, WorkflowError, read_json, run_cli, write_json
from neox_mlc.hf_checkpoint import load_arch
from neox_mlc.neox_config import DEFAULT_MAX_BATCH_SIZE, MAX_PREFILL_CHUNK, check_context_window
from neox_mlc.quantization import QUANTIZATIONS, get_quantization
from neox_mlc.templates import validate_template

CHAT_CONFIG_VERSION = "0.1.0"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json")


def load_templates(path: str | Path = REPO_ROOT / "config.yaml") -> dict[str, dict[str, Any]]:
    """The conversation templates kept as data in the workflow config."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return data.get("conv_templates", {})


def conv_template(name: str, tpl: dict[str, Any], bos_token_id: int) -> dict[str, Any]:
    """Expand template data into MLC's ``conv_template`` object."""
    validate_template(name, tpl)
    return {
        "name": name,
        "system_template": "{system_message}",
        "system_message": tpl["system_message"],
        "system_prefix_token_ids": [bos_token_id] if tpl["add_bos"] else None,
        "add_role_after_system_message": True,
        "roles": {"user": tpl["roles"]["user"], "assistant": tpl["roles"]["assistant"]},
        "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}", "tool": "{tool_message}"},
        "messages": [],
        "seps": list(tpl["seps"]),
        "role_content_sep": tpl["role_content_sep"],
        "role_empty_sep": tpl["role_empty_sep"],
        "stop_str": list(tpl["stop_str"]),
        "stop_token_ids": list(tpl["stop_token_ids"]),
        "strip_reasoning_in_history": False,
        "function_string": "",
        "use_function_calling": False,
    }


def tokenizer_info(tokenizer_json: dict[str, Any] | None) -> dict[str, Any]:
    """How the runtime must post-process tokens, detected from tokenizer.json like MLC does."""
    info = {"token_postproc_method": "byte_fallback", "prepend_space_in_encode": False, "strip_space_in_decode": False}
    if not tokenizer_json:
        return info
    text = json.dumps(tokenizer_json.get("decoder"))
    if "ByteLevel" in text:
        info["token_postproc_method"] = "byte_level"
    normalizer = json.dumps(tokenizer_json.get("normalizer")) + json.dumps(tokenizer_json.get("pre_tokenizer"))
    if '"Prepend"' in normalizer or ('"Metaspace"' in normalizer and '"prepend_scheme": "never"' not in normalizer):
        info["prepend_space_in_encode"] = True
    # SentencePiece's Metaspace decoder drops the space it prepended; so must the runtime.
    if '"Strip"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text):
        info["strip_space_in_decode"] = True
    return info


def stop_ids_with_eos(stop_ids: list[int], eos_token_id: int) -> list[int]:
    """The template's stop ids, then the checkpoint's end-of-sequence id if the template lacks it."""
    return list(stop_ids) + ([eos_token_id] if eos_token_id not in stop_ids else [])


def make_chat_config(
    model_dir: str | Path,
    quantization: str,
    template_name: str,
    template: dict[str, Any],
    context_window_size: int,
    tokenizer_dir: str | Path | None = None,
    prefill_chunk_size: int | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    eos_stop: bool = True,
) -> dict[str, Any]:
    """Build the chat config dict (pure: reads files, writes nothing); ``eos_stop``: stop on eos too."""
    get_quantization(quantization)
    arch, hf = load_arch(model_dir)
    check_context_window(context_window_size, arch.max_position_embeddings)
    tok_dir = Path(tokenizer_dir or model_dir)
    tok_path = tok_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise WorkflowError(f"tokenizer.json not found in {tok_dir}; run the tokenizer step first")
    tok = read_json(tok_path, "tokenizer.json")
    from tokenizers import Tokenizer

    active_vocab = Tokenizer.from_file(str(tok_path)).get_vocab_size(with_added_tokens=True)
    prefill = prefill_chunk_size or min(context_window_size, MAX_PREFILL_CHUNK)
    model_config = arch.model_config(context_window_size, prefill, max_batch_size).to_dict()
    conv = conv_template(template_name, template, arch.bos_token_id)
    if eos_stop:
        conv["stop_token_ids"] = stop_ids_with_eos(conv["stop_token_ids"], arch.eos_token_id)
    return {
        "version": CHAT_CONFIG_VERSION,
        "model_type": "gpt_neox",
        "quantization": quantization,
        "model_config": model_config,
        "vocab_size": arch.vocab_size,
        "context_window_size": context_window_size,
        "sliding_window_size": -1,
        "prefill_chunk_size": prefill,
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "active_vocab_size": active_vocab,
        "temperature": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "top_p": 1.0,
        "tokenizer_files": [f for f in TOKENIZER_FILES if (tok_dir / f).is_file()],
        "tokenizer_info": tokenizer_info(tok),
        "conv_template": conv,
        "pad_token_id": hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": arch.eos_token_id,
        "model_task": "chat",
        "embedding_metadata": None,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="model directory holding config.json")
    ap.add_argument("--quantization", required=True, help=f"one of {', '.join(QUANTIZATIONS)}")
    ap.add_argument("--conv-template", required=True, help="template name (defined in config.yaml conv_templates)")
    ap.add_argument("--conv-template-json", help="template definition as JSON (overrides the config.yaml lookup)")
    ap.add_argument("--context-window-size", type=int, required=True)
    ap.add_argument("--prefill-chunk-size", type=int)
    ap.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE)
    ap.add_argument("--tokenizer-dir", help="directory with tokenizer.json (default: the model directory)")
    ap.add_argument("--skip-tokenizer-copy", action="store_true", help="write only mlc-chat-config.json")
    ap.add_argument("--no-eos-stop", action="store_true", help="stop ids exactly as the template lists them (as mlc_llm does)")
    ap.add_argument("-o", "--output", required=True, help="output directory")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.conv_template_json:
        template = json.loads(args.conv_template_json)
    else:
        templates = load_templates()
        if args.conv_template not in templates:
            raise WorkflowError(f"unknown conversation template {args.conv_template!r}; defined: {sorted(templates)}")
        template = templates[args.conv_template]
    cfg = make_chat_config(
        args.config, args.quantization, args.conv_template, template, args.context_window_size,
        args.tokenizer_dir, args.prefill_chunk_size, args.max_batch_size, eos_stop=not args.no_eos_stop,
    )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_tokenizer_copy:
        tok_dir = Path(args.tokenizer_dir or args.config)
        for name in cfg["tokenizer_files"]:
            shutil.copyfile(tok_dir / name, out / name)
    write_json(out / "mlc-chat-config.json", cfg)
    return 0


if __name__ == "__main__":
    run_cli(main)
