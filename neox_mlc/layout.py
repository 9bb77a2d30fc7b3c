"""Where every artifact lives, and the names derived from model and quantization: one place.

Why: the Snakefile, the packaging script, the chat runner and the tests all need the same paths;
spelling them once keeps a rename from silently splitting the workflow in two.
"""

from __future__ import annotations

import re

# Targets the compiler knows, and the file each library becomes (``iphone``/``metal``: a static
# archive of objects for Xcode to link; others: a shared library the host can dlopen).
LIB_EXT = {"llvm": "so", "cpu": "so", "cuda": "so", "vulkan": "so", "iphone": "tar", "metal": "tar"}
TARGETS = tuple(LIB_EXT)
# Targets named for MLC compatibility that this machine's TVM cannot build, and why: refused at planning.
UNBUILDABLE = {"vulkan": "the PyPI apache-tvm 0.26 has no SPIR-V (Vulkan) codegen"}

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def bundle_id(model: str, quant: str) -> str:
    """The bundle's name: what the MLC app calls ``model_id`` / ``local_id``."""
    return f"{model}-{quant}"


def generated_dir(model: str) -> str:
    return f"resources/generated/{model}"


def snapshot_dir(model: str) -> str:
    return f"resources/models/{model}"


def tokenizer_dir(model: str) -> str:
    return f"build/{model}/tokenizer"


def quant_dir(model: str, quant: str) -> str:
    return f"build/{model}/{quant}"


def params_dir(model: str, quant: str) -> str:
    return f"{quant_dir(model, quant)}/params"


def weight_plan(model: str, quant: str) -> str:
    return f"{quant_dir(model, quant)}/weight-plan.json"


def chat_config(model: str, quant: str) -> str:
    return f"{quant_dir(model, quant)}/mlc-chat-config.json"


def library(model: str, quant: str, target: str) -> str:
    return f"{quant_dir(model, quant)}/lib/{bundle_id(model, quant)}-{target}.{LIB_EXT[target]}"


def app_config(model: str, quant: str) -> str:
    return f"{quant_dir(model, quant)}/app-config.json"


def mlc_app_config(model: str, quant: str) -> str:
    return f"{quant_dir(model, quant)}/mlc-app-config.json"


def dist_dir(model: str, quant: str) -> str:
    return f"dist/{bundle_id(model, quant)}"


def system_lib_prefix(model: str, quant: str) -> str:
    """The symbol prefix of a statically linked (iOS) library; also the app's ``model_lib``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{model}_{quant}") + "_"
