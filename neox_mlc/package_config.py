"""MLC's ``mlc-package-config.json``: read it with ``mlc_llm package``'s checks, match it to bundles, write one.

Why its own module: the workflow reads a user's package config at planning time (before any job,
one-line errors), and planning imports no job module; the ``app`` step writes one beside the app.
The format and the checks are MLC-LLM's (commit 79d603f, python/mlc_llm/interface/package.py and
ios/MLCChat/mlc-package-config.json): ``device``, ``model_list`` of ``{model, model_id, model_lib,
estimated_vram_bytes, bundle_weight, overrides}``, ``model_lib_path_for_prepare_libs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neox_mlc.common import WorkflowError, read_json

SUPPORTED_DEVICES = ("iphone",)



def _is_local(model: str) -> bool:
    return not model.startswith("HF://") and not model.startswith("https://")


def model_url_of(model: str) -> str:
    """``model`` of a package-config entry as the app's ``model_url`` (MLC: HF:// → https://huggingface.co/)."""
    return model.replace("HF://", "https://huggingface.co/")


def read_package_config(path: Path) -> list[dict[str, Any]]:
    """Entries of an ``mlc-package-config.json``, checked as ``mlc_llm package`` checks them, one line each.

    Each entry is returned as ``{model, model_id, model_lib, estimated_vram_bytes, bundle_weight,
    overrides}``. What the entries mean for this workflow (which bundle, which compile settings) is
    checked by :func:`match_package_config`.
    """
    doc = read_json(path, "MLC package config")
    if not isinstance(doc, dict):
        raise WorkflowError(f'{path}: expected a dict with field "model_list"; got {type(doc).__name__}')
    if "device" not in doc:
        raise WorkflowError(f'{path}: field "device" is required; allowed: {", ".join(SUPPORTED_DEVICES)}')
    if doc["device"] not in SUPPORTED_DEVICES:
        raise WorkflowError(f'{path}: device {doc["device"]!r} is not supported here; allowed: {", ".join(SUPPORTED_DEVICES)}')
    entries = doc.get("model_list", [])
    if not isinstance(entries, list):
        raise WorkflowError(f'{path}: "model_list" must be a list; got {type(entries).__name__}')
    if not isinstance(doc.get("model_lib_path_for_prepare_libs", {}), dict):
        raise WorkflowError(f'{path}: "model_lib_path_for_prepare_libs" must be a dict')
    out, seen = [], set()
    for i, e in enumerate(entries):
        where = f"{path}: model_list[{i}]"
        if not isinstance(e, dict):
            raise WorkflowError(f"{where} must be a dict; got {type(e).__name__}")
        for key in ("model", "model_id", "estimated_vram_bytes"):
            if key not in e:
                raise WorkflowError(f'{where} lacks "{key}"; required: model, model_id, estimated_vram_bytes')
        checks = (
            ("model", e["model"], str, "a string"),
            ("model_id", e["model_id"], str, "a string"),
            ("bundle_weight", e.get("bundle_weight", False), bool, "a boolean"),
            ("overrides", e.get("overrides", {}), dict, "a dict"),
            ("model_lib", e.get("model_lib", ""), str, "a string"),
        )
        for key, value, typ, what in checks:
            if not isinstance(value, typ):
                raise WorkflowError(f"{where}: {key} = {value!r} must be {what}")
        est = e["estimated_vram_bytes"]
        if isinstance(est, bool) or not isinstance(est, int) or est <= 0:
            raise WorkflowError(f"{where}: estimated_vram_bytes = {est!r} must be a positive integer (bytes)")
        bundle = e.get("bundle_weight", False)
        if _is_local(e["model"]) and not bundle:
            raise WorkflowError(f'{where}: model "{e["model"]}" is a local path; set "bundle_weight": true for it')
        if e["model_id"] in seen:
            raise WorkflowError(f"{where}: model_id {e['model_id']!r} appears twice")
        seen.add(e["model_id"])
        out.append({
            "model": e["model"], "model_id": e["model_id"], "model_lib": e.get("model_lib"),
            "estimated_vram_bytes": est, "bundle_weight": bundle, "overrides": e.get("overrides", {}),
        })
    if not out:
        raise WorkflowError(f'{path}: "model_list" is empty; list at least one model')
    return out


def match_package_config(
    entries: Sequence[dict[str, Any]], bundles: dict[str, tuple[str, str]], model_libs: dict[str, str], compiled: dict[str, int]
) -> list[tuple[str, str]]:
    """Map package-config entries onto this workflow's bundles ``(model, quant)``; one-line error otherwise.

    ``bundles``: model_id → (model, quant) for every configured model × known quantization;
    ``model_libs``: model_id → the model_lib this workflow compiles; ``compiled``: the context window and
    prefill chunk every library is compiled with (overrides must agree: one compile per bundle).
    """
    picked = []
    for e in entries:
        mid = e["model_id"]
        if mid not in bundles:
            raise WorkflowError(f"model_id {mid!r} in the package config names no bundle; allowed: {', '.join(sorted(bundles))}")
        if e["model_lib"] and e["model_lib"] != model_libs[mid]:
            raise WorkflowError(f"model_lib {e['model_lib']!r} for model_id {mid!r}: this workflow compiles it as {model_libs[mid]!r}")
        for key, value in e["overrides"].items():
            if key not in compiled:
                raise WorkflowError(f"override {key!r} for model_id {mid!r} is not supported here; allowed: {', '.join(compiled)}")
            if value != compiled[key]:
                raise WorkflowError(
                    f"override {key}={value!r} for model_id {mid!r} differs from the compiled {compiled[key]} "
                    f"(set --config max_seq_len to change the context window)"
                )
        picked.append(bundles[mid])
    return picked


def package_config(entries: Sequence[dict[str, Any]], chat_configs: dict[str, dict[str, Any]], libs: dict[str, str]) -> dict[str, Any]:
    """An ``mlc-package-config.json`` describing the app, for the real ``mlc_llm package``.

    Paths are relative to the app directory (run ``mlc_llm package`` there): ``model`` is the bundled
    weights under ``bundle/`` (or ``HF://…`` for download-on-device), and
    ``model_lib_path_for_prepare_libs`` points at each bundle's own iphone tar, so MLC links these
    libraries instead of compiling its own.
    """
    model_list = []
    for e in entries:
        cfg = chat_configs[e["model_id"]]
        url = e.get("model_url")
        model_list.append({
            "model": url.replace("https://huggingface.co/", "HF://") if url else f"bundle/{e['model_id']}",
            "model_id": e["model_id"],
            "model_lib": e["model_lib"],
            "estimated_vram_bytes": e["estimated_vram_bytes"],
            "bundle_weight": not url,
            "overrides": {"context_window_size": cfg["context_window_size"], "prefill_chunk_size": cfg["prefill_chunk_size"]},
        })
    return {"device": "iphone", "model_list": model_list, "model_lib_path_for_prepare_libs": dict(libs)}
