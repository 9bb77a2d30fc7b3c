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


def model_config(model: str) -> str:
    """The checkpoint's config.json fetched alone, before the weights (one small file)."""
    return f"resources/configs/{model}/config.json"


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


def model_lib(model: str, quant: str) -> str:
    """The app's ``model_lib``: ``{model}_{quant}`` with every character but letters, digits and ``_`` as ``_``.

    Why this spelling: the app loads ``"system://" + model_lib`` (ios/MLCSwift LLMEngine.swift) and the
    runtime asks TVM-FFI for the system library ``model_lib`` with ``-`` → ``_``, plus ``_``
    (cpp/serve/function_table.cc), so the library must be compiled with ``model_lib + "_"`` as its
    symbol prefix (python/mlc_llm/interface/jit.py). Replacing ``.`` too keeps symbols C identifiers.
    """
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{model}_{quant}")


def runtime_system_lib(model_lib_name: str) -> str:
    """The system-library prefix MLC's runtime looks up for ``model_lib`` (cpp/serve/function_table.cc)."""
    return model_lib_name.replace("-", "_") + "_"


def system_lib_prefix(model: str, quant: str) -> str:
    """The symbol prefix a statically linked (iOS) library is compiled with: what the runtime looks up."""
    return runtime_system_lib(model_lib(model, quant))


APP_DIR = "dist/app"


def app_dir() -> str:
    """Every bundle in one iOS app, as ``mlc_llm package`` lays it out (lib/, bundle/)."""
    return APP_DIR
