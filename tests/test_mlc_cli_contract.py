"""``backend: mlc_llm`` calls the real CLI: its argv must be one MLC-LLM's own parsers accept.

The option tables below are facts read from MLC-LLM's source (python/mlc_llm/cli/convert_weight.py and
python/mlc_llm/cli/compile.py: names, required flags, choices and the system-lib-prefix pattern);
this project's argv builders are parsed with them, so a renamed or missing flag fails here instead of
on a user's machine. MLC's ``type=`` hooks that touch the disk (detect_config, ...) are left out.
"""

from __future__ import annotations

import argparse
import re

import pytest

from neox_mlc.compile import mlc_llm_argv as compile_argv
from neox_mlc.convert_weight import mlc_llm_argv as convert_argv
from neox_mlc.quantization import QUANTIZATIONS

# MLC's quantization names that this project also implements (MLC has more: q4f16_awq, q4f16_ft, e4m3...)
MLC_QUANTIZATIONS = ["q0f16", "q0f32", "q3f16_0", "q3f16_1", "q4f16_0", "q4f16_1", "q4f32_1", "q4f16_autoawq", "q4f16_ft"]


def _system_lib_prefix(prefix: str) -> str:
    if prefix == "" or re.match(r"^[a-zA-Z_][a-zA-Z0-9_]*$", prefix):
        return prefix
    raise argparse.ArgumentTypeError(f"invalid prefix {prefix!r}")


def _mlc_convert_weight_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("config")
    p.add_argument("--quantization", required=True, choices=MLC_QUANTIZATIONS)
    p.add_argument("--model-type", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--source", default="auto")
    p.add_argument("--source-format", choices=["auto", "huggingface-torch", "huggingface-safetensor", "awq"], default="auto")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--lora-adapter")
    return p


def _mlc_compile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("model")
    p.add_argument("--quantization", choices=MLC_QUANTIZATIONS)
    p.add_argument("--model-type", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--host", default="auto")
    p.add_argument("--enable-subgroups", action="store_true")
    p.add_argument("--opt", default="O2")
    p.add_argument("--system-lib-prefix", type=_system_lib_prefix, default="auto")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--overrides", default="")
    p.add_argument("--debug-dump")
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    # argparse exits on some errors even with exit_on_error=False (unknown args): turn both into a failure
    try:
        ns, extra = parser.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit) as err:
        pytest.fail(f"MLC-LLM would reject {argv}: {err}")
    assert extra == [], f"MLC-LLM does not know {extra}"
    return ns


@pytest.mark.parametrize("quant", list(QUANTIZATIONS))
def test_convert_weight_argv_is_accepted_by_mlc(quant):
    argv = convert_argv("resources/models/m", quant, "build/m/params")
    assert argv[:2] == ["mlc_llm", "convert_weight"]
    ns = _parse(_mlc_convert_weight_parser(), argv[2:])
    assert (ns.config, ns.quantization, ns.output, ns.device) == ("resources/models/m", quant, "build/m/params", "cpu")


@pytest.mark.parametrize("device,mlc_device", [("llvm", "cpu"), ("iphone", "iphone"), ("metal", "metal"), ("cuda", "cuda")])
def test_compile_argv_is_accepted_by_mlc(device, mlc_device):
    argv = compile_argv("build/m/q4f16_1/mlc-chat-config.json", device, "lib/m.tar", "tiny_neox_ja_q4f16_1_")
    assert argv[:2] == ["mlc_llm", "compile"]
    ns = _parse(_mlc_compile_parser(), argv[2:])
    assert (ns.model, ns.device, ns.output) == ("build/m/q4f16_1/mlc-chat-config.json", mlc_device, "lib/m.tar")
    assert ns.system_lib_prefix == "tiny_neox_ja_q4f16_1_"


def test_a_prefix_mlc_would_reject_is_caught():
    with pytest.raises(pytest.fail.Exception):
        _parse(_mlc_compile_parser(), compile_argv("c.json", "iphone", "o.tar", "tiny-neox-ja_q4f16_1_")[2:])
