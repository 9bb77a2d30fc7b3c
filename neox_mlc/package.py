"""Package: app configs, the per-model bundle, and the iOS app directory ``mlc_llm package`` lays out.

Three verbs, three artifacts (each its own workflow rule):

* ``app-config``: ``app-config.json`` in the seed app's form (``model_libs``, ``model_list`` of
  ``{model_url, local_id}``, ``add_model_samples``; ``model_url`` is ``""`` for weights bundled into the
  app) and ``mlc-app-config.json`` in the form today's MLC iOS app reads (one entry, see
  :func:`app_entry`). ``estimated_vram_bytes`` is MLC's estimate from the library's ``_metadata``
  (:func:`estimate_vram`).
* ``bundle``: copies (hard-links) params, chat config, tokenizer files, libraries and app configs into
  ``dist/<model>-<quant>/`` and writes ``MANIFEST.json`` (size and sha256 of every file, provenance,
  the runtime ABI the iOS library needs), all in a temporary directory renamed into place.
* ``app``: what ``mlc_llm package`` lays out for the MLC iOS app, for several bundles at once —
  ``lib/libmodel_iphone.a`` (every bundle's iphone objects, validated as MLC validates it),
  ``bundle/mlc-app-config.json``, ``bundle/<model_id>/`` for bundled weights — plus an
  ``mlc-package-config.json`` to continue with the real ``mlc_llm package`` and a ``MANIFEST.json``.

Read against MLC-LLM at commit 79d603f (the commit whose TVM matches apache-tvm 0.26.0):
``python/mlc_llm/interface/package.py`` (app config entries, ``validate_model_lib``),
``python/mlc_llm/interface/jit.py`` (``--system-lib-prefix model_lib + "_"``),
``cpp/serve/function_table.cc`` (``ffi.SystemLib(model_lib with '-'→'_' + "_")``),
``ios/MLCSwift/Sources/Swift/LLMEngine.swift`` (``"model_lib": "system://" + modelLib``),
``ios/MLCChat/MLCChat/States/ChatState.swift`` (refuses a model when ``os_proc_available_memory()`` <
``estimated_vram_bytes``) and ``python/mlc_llm/cli/model_metadata.py`` (the memory estimate).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neox_mlc.common import WorkflowError, atomic_path, check_output, read_json, run_cli, sha256_file, write_json
from neox_mlc.package_config import model_url_of, package_config, read_package_config
from neox_mlc.staticlib import MachObject, read_archive, read_macho, tar_objects, write_archive
from neox_mlc.tensor_cache import verify_cache

TOOL_PACKAGES = ("apache-tvm", "apache-tvm-ffi", "numpy", "safetensors", "tokenizers", "transformers", "huggingface_hub", "snakemake", "torch")

# The symbol a statically linked model library registers itself under (TVM-FFI's system library):
# ``<system_lib_prefix>__tvm_ffi__library_bin``. MLC's validation looks for ``model_lib + this``.
LIBRARY_BIN_SUFFIX = "___tvm_ffi__library_bin"
# The MLC-LLM commit whose iOS runtime (ios/prepare_libs.sh: libmlc_llm.a, libtvm_runtime.a,
# tvm-ffi) links these libraries: the one the reference fixtures were made with (apache-tvm 0.26.0).
MLC_LLM_COMMIT = "79d603f"
APP_LIB_NAME = "libmodel_iphone.a"


# ------------------------------------------------------------------ the library's _metadata


def library_metadata(lib: Path) -> dict[str, Any]:
    """The ``_metadata`` JSON a compiled model library carries (params, kv_cache, memory_usage).

    Why from the bytes: an iPhone library cannot be loaded on this host. TVM serialises the Relax VM
    executable into the library's ``__tvm_ffi__library_bin`` blob, where the string constant returned by
    ``_metadata`` is stored as a little-endian uint64 length followed by the JSON text; it is found by
    that framing and accepted only if it parses and has MLC's keys.
    """
    blobs = [data for _, data in tar_objects(lib)] if lib.suffix == ".tar" else [lib.read_bytes()]
    key = b'{"model_type"'
    for data in blobs:
        start = data.find(key)
        while start >= 8:
            (n,) = struct.unpack_from("<Q", data, start - 8)
            try:
                meta = json.loads(data[start : start + n])
            except ValueError:
                meta = None
            if isinstance(meta, dict) and {"params", "kv_cache", "memory_usage", "context_window_size"} <= meta.keys():
                return meta
            start = data.find(key, start + 1)
    raise WorkflowError(f"{lib}: no _metadata found in the library; rebuild it with `neox-mlc compile`")


def _itemsize(dtype: str) -> int:
    m = re.search(r"(\d+)$", dtype)
    return max(1, int(m.group(1)) // 8) if m else 1


@dataclass(frozen=True)
class VramEstimate:
    """MLC's three terms (python/mlc_llm/cli/model_metadata.py: _compute_memory_usage, _report_memory_usage)."""

    params: int  # every _metadata.params entry: prod(shape) × dtype size, as the runtime loads it
    temporary: int  # the largest planned temporary buffer of any function (max of memory_usage)
    kv_cache: int  # head_dim × layers × kv_heads × dtype bytes × 2 (K, V) × context_window_size
    context_window_size: int

    @property
    def total(self) -> int:
        return self.params + self.temporary + self.kv_cache


def _dim(d: int | str, chat_config: dict[str, Any] | None) -> int:
    """A shape entry; a symbolic one (MLC writes e.g. ``"vocab_size"``) is read from the chat config."""
    if isinstance(d, int):
        return d
    for scope in (chat_config or {}, (chat_config or {}).get("model_config", {})):
        if d in scope:
            return int(scope[d])
    raise WorkflowError(f"parameter shape names {d!r}, which the chat config does not define; pass the model's mlc-chat-config.json")


def estimate_vram(meta: dict[str, Any], chat_config: dict[str, Any] | None = None) -> VramEstimate:
    """Bytes the app needs for one model, computed from the library's own ``_metadata``.

    Why this and not the file sizes: the library knows what it loads (float32 tensors stored as
    bfloat16 are loaded as float32) and what its memory planner allocates; MLC's ``model_metadata``
    tool sums exactly these, and the app compares the total with ``os_proc_available_memory()``.
    Symbolic dimensions are resolved from ``chat_config`` as MLC's ``_read_dynamic_shape`` does.
    """
    params = sum(math.prod(_dim(d, chat_config) for d in p["shape"]) * _itemsize(p["dtype"]) for p in meta["params"])
    temporary = max([int(v) for v in meta["memory_usage"].values()] or [0])
    kv = meta["kv_cache"]
    dtype_bytes = 4 if "f32" in meta["quantization"] else 2
    per_token = kv["head_dim"] * kv["num_hidden_layers"] * kv["num_key_value_heads"] * dtype_bytes * 2
    window = int(meta["context_window_size"])
    return VramEstimate(params, temporary, per_token * window, window)


# ------------------------------------------------------------------ will it fit on an iPhone?


@dataclass(frozen=True)
class IPhoneBudget:
    """What iOS lets one app use on a class of iPhones, as ``os_proc_available_memory()`` reports it.

    Apple publishes no per-device figures: the entitlement's documentation says only that "an increased
    memory limit is only available on some device models" and to ask ``os_proc_available_memory()``.
    The figures are measurements at app launch reported by developers of on-device ML apps (sources).
    """

    devices: str
    ram_gb: int
    default_bytes: int  # without any entitlement
    entitled_bytes: int  # with com.apple.developer.kernel.increased-memory-limit
    source: str


ENTITLEMENT = "com.apple.developer.kernel.increased-memory-limit"
# iPhone 12 and later: the iphone target is built for apple-a14 (neox_mlc/compile.py).
IPHONE_BUDGETS = (
    IPhoneBudget("iPhone 12 mini, 12, 13 mini, 13, SE (3rd gen)", 4, 2_100_000_000, 2_400_000_000,
                 "allenai/OLMoE.swift#38 (iPhone 12 mini: 2.1 GB, 2.4 GB entitled)"),
    IPhoneBudget("iPhone 12 Pro, 13 Pro, 14, 14 Pro, 15, 15 Plus", 6, 3_120_000_000, 4_200_000_000,
                 "a-ghorbani/pocketpal-ai#651 (iPhone 13 Pro: 3.12 GB, 4.20 GB entitled)"),
    IPhoneBudget("iPhone 15 Pro, 16, 16 Plus, 16 Pro, 16e, 17", 8, 3_000_000_000, 6_000_000_000,
                 "introlab/rtabmap#1446 (iPhone 15 Pro: 3 GB, 6 GB entitled); ml-explore/mlx-swift-lm#343 (iPhone 17: 6 GB at most)"),
    IPhoneBudget("iPhone 17 Pro, 17 Pro Max, Air", 12, 3_300_000_000, 6_000_000_000,
                 "LNPANDY/NX2Apple ENTITLEMENTS.md (12 GB iPhone: about 3.3 GB, 6-8 GB entitled)"),
)


def fit_table(estimated: int) -> list[dict[str, Any]]:
    """Per device class: does ``estimated`` bytes fit the default budget, and with the entitlement?"""
    return [
        {
            "devices": b.devices, "ram_gb": b.ram_gb,
            "budget_bytes": b.default_bytes, "entitled_budget_bytes": b.entitled_bytes,
            "fits": estimated <= b.default_bytes, "fits_with_entitlement": estimated <= b.entitled_bytes,
        }
        for b in IPHONE_BUDGETS
    ]


def fit_warnings(model_id: str, estimated: int) -> list[str]:
    """One warning line per device class the bundle does not fit without the entitlement."""
    lines = []
    for row in fit_table(estimated):
        if row["fits"]:
            continue
        how = f"fits only with {ENTITLEMENT}" if row["fits_with_entitlement"] else "does not fit even with the increased-memory entitlement"
        lines.append(
            f"warning: {model_id} needs {estimated / 1e9:.2f} GB (estimated_vram_bytes) but {row['devices']} "
            f"({row['ram_gb']} GB RAM) grant an app {row['budget_bytes'] / 1e9:.2f} GB "
            f"({row['entitled_budget_bytes'] / 1e9:.2f} GB entitled): {how}"
        )
    return lines


# ------------------------------------------------------------------ app config entries (MLC's form)


def app_entry(model_id: str, model_lib: str, estimated: int, model_url: str | None) -> dict[str, Any]:
    """One ``mlc-app-config.json`` entry as ``mlc_llm package`` writes it for ``device: iphone``.

    Key order and presence follow interface/package.py: ``model_id``, ``model_lib``, then
    ``model_path`` (weights bundled into the app, relative to ``bundle/``) **or** ``model_url``
    (downloaded on the device), then ``estimated_vram_bytes``.
    """
    entry: dict[str, Any] = {"model_id": model_id, "model_lib": model_lib}
    if model_url:
        entry["model_url"] = model_url
    else:
        entry["model_path"] = model_id
    entry["estimated_vram_bytes"] = int(estimated)
    return entry


def seed_app_config(model_id: str, model_url: str | None) -> dict[str, Any]:
    """The seed (2023) app's ``app-config.json``: ``model_url`` is ``""`` for weights in the app bundle.

    Why "": the seed app builds a URL from it and finds none, so the model is taken from the app's
    own bundled ``dist/`` directory (ios/MLCChat/States/AppState.swift, loadPrebuiltModels).
    """
    return {
        "model_libs": [model_id],
        "model_list": [{"model_url": model_url or "", "local_id": model_id}],
        "add_model_samples": [],
    }


def app_configs(
    model_id: str, model_lib: str, model_url: str | None, lib: Path, chat_config: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The seed app's and today's app's config for one bundle; the estimate comes from ``lib``."""
    estimated = estimate_vram(library_metadata(lib), chat_config).total
    for line in fit_warnings(model_id, estimated):
        print(line, file=sys.stderr)
    return seed_app_config(model_id, model_url), {"model_list": [app_entry(model_id, model_lib, estimated, model_url)]}


# ------------------------------------------------------------------ the runtime ABI


def tvm_ffi_c_api() -> frozenset[str]:
    """Mach-O names of the C functions tvm-ffi exports (``TVM_FFI_DLL`` in its C headers).

    Why parse the installed headers: they are the ABI the compiler generated calls against; an
    iOS library may import nothing else, or the app's runtime (MLC's libtvm_runtime.a + tvm-ffi) will
    leave it unresolved at link time.
    """
    import tvm_ffi

    include = Path(tvm_ffi.__file__).parent / "include" / "tvm" / "ffi"
    names: set[str] = set()
    for header in (include / "c_api.h", include / "extra" / "c_env_api.h"):
        text = header.read_text(encoding="utf-8")
        names.update(re.findall(r"TVM_FFI_DLL\b[^;{]*?\b(TVMFFI\w+)\s*\(", text))
    if not names:
        raise WorkflowError(f"no TVM_FFI_DLL functions found under {include}")
    return frozenset("_" + n for n in names)


def tvm_ffi_header_version() -> str:
    import tvm_ffi

    text = (Path(tvm_ffi.__file__).parent / "include" / "tvm" / "ffi" / "c_api.h").read_text(encoding="utf-8")
    parts = [re.search(rf"#define TVM_FFI_VERSION_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(p.group(1) if p else "?" for p in parts)


def runtime_abi(objects: Sequence[MachObject]) -> dict[str, Any]:
    """What the app's runtime must provide: the imported symbols, and the tvm-ffi / TVM / MLC versions."""
    imports = sorted(set().union(*(o.undefined for o in objects))) if objects else []
    return {
        "imports": imports,
        "tvm_ffi_c_api": tvm_ffi_header_version(),
        "apache_tvm_ffi": _version("apache-tvm-ffi"),
        "apache_tvm": _version("apache-tvm"),
        "mlc_llm_commit": MLC_LLM_COMMIT,
        "requirement": (
            f"link with MLC-LLM's iOS runtime built at commit {MLC_LLM_COMMIT} (ios/prepare_libs.sh), whose tvm-ffi "
            f"exports the TVM-FFI C API {tvm_ffi_header_version()}; the library imports only the symbols listed"
        ),
    }


def check_imports(objects: Sequence[MachObject], where: str) -> None:
    """Stop when a library imports a symbol tvm-ffi does not export (the app would fail to link)."""
    allowed = tvm_ffi_c_api()
    foreign = sorted(set().union(*(o.undefined for o in objects)) - allowed) if objects else []
    if foreign:
        raise WorkflowError(f"{where} imports {', '.join(foreign)}, outside the TVM-FFI C API the app's runtime exports")


# ------------------------------------------------------------------ libmodel_iphone.a


def model_lib_symbol(model_lib: str) -> str:
    """The symbol MLC's validation looks for (interface/package.py validate_model_lib), without Mach-O's ``_``."""
    return model_lib.replace("-", "_") + LIBRARY_BIN_SUFFIX


def available_model_libs(global_symbols: set[str]) -> list[str]:
    """Model libs an archive or object holds, read from its symbols as MLC's ``_get_model_libs`` does."""
    libs = []
    for name in sorted(global_symbols):
        if name.endswith(LIBRARY_BIN_SUFFIX):
            lib = name[: -len(LIBRARY_BIN_SUFFIX)]
            libs.append(lib.removeprefix("_"))
    return libs


def check_model_lib(model_lib: str, model_id: str, global_symbols: set[str], where: str) -> None:
    """MLC's validation: ``model_lib`` ('-'→'_') + ``___tvm_ffi__library_bin`` must be defined in ``where``."""
    sym = model_lib_symbol(model_lib)
    if sym not in global_symbols and "_" + sym not in global_symbols:
        raise WorkflowError(
            f"model_lib {model_lib} (model_id {model_id}) is not in {where}; model_libs found: {available_model_libs(global_symbols)}"
        )


def _archive_members(libs: Sequence[tuple[str, Path]]) -> list[tuple[str, bytes]]:
    """Every library tar's objects, each named under its model_lib so that names never collide."""
    members = []
    for model_lib, tar in libs:
        for name, data in tar_objects(tar):
            members.append((name if name.startswith(model_lib) else f"{model_lib}_{name}", data))
    return members


def check_duplicates(objects: Sequence[MachObject], where: str) -> None:
    """Two strong definitions of one symbol would fail the app's link with -all_load (ld64: duplicate symbol)."""
    owner: dict[str, str] = {}
    for obj in objects:
        for sym in obj.strong:
            if sym in owner:
                raise WorkflowError(f"{where}: symbol {sym} is defined in both {owner[sym]} and {obj.name}")
            owner[sym] = obj.name


def make_model_lib_archive(out: Path, libs: Sequence[tuple[str, Path]], entries: Sequence[dict[str, Any]]) -> list[MachObject]:
    """Write ``libmodel_iphone.a`` from ``(model_lib, iphone tar)`` pairs and validate it like ``mlc_llm package``.

    The validation reads the written archive back (its members and table of contents), not the inputs.
    """
    with atomic_path(out) as tmp:
        write_archive(tmp, _archive_members(libs))
        archive = read_archive(tmp)
        objects = archive.objects()
        symbols = archive.global_symbols()
        if set(archive.toc) != symbols:
            raise WorkflowError(f"{out}: table of contents does not match the members' symbols")
        check_duplicates(objects, str(out))
        for entry in entries:
            check_model_lib(entry["model_lib"], entry["model_id"], symbols, str(out))
    return objects


# ------------------------------------------------------------------ files


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in TOOL_PACKAGES:
        version = _version(pkg)
        if version != "not installed":
            out[pkg] = version
    return out


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _files(root: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _mach_o_objects(libs: Sequence[Path]) -> list[MachObject]:
    return [read_macho(data, f"{lib.name}:{name}") for lib in libs if lib.suffix == ".tar" for name, data in tar_objects(lib)]


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
    """Assemble the bundle atomically and return its manifest.

    Before anything is written, the app config's ``model_lib`` is checked against the symbols of
    every static (iphone/metal) library as ``mlc_llm package`` checks it, and their imports against
    the TVM-FFI C API.
    """
    inputs = [params, chat_config, tokenizer, *libs, app_config, mlc_app_config, snapshot]
    check_output(out, "package", inputs)
    index = verify_cache(params, check_md5=True)
    cfg = read_json(chat_config, "chat config")
    entry = read_json(mlc_app_config, "app config")["model_list"][0]
    objects: list[MachObject] = []
    for lib in (p for p in libs if p.suffix == ".tar"):
        lib_objects = _mach_o_objects([lib])
        check_model_lib(entry["model_lib"], model_id, set().union(*(o.defined for o in lib_objects)), str(lib))
        objects += lib_objects
    check_imports(objects, model_id)
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
            "files": _files(tmp),
        }
        if objects:
            manifest["runtime_abi"] = runtime_abi(objects)
        write_json(tmp / "MANIFEST.json", manifest)
    return manifest


@dataclass(frozen=True)
class AppModel:
    """One bundle as the app sees it: its entry, its iphone library, its weights and chat config."""

    entry: dict[str, Any]
    iphone_lib: Path
    weights: Path
    chat_config: dict[str, Any]


def read_bundle(dist: Path, override: dict[str, Any] | None = None) -> AppModel:
    """A built ``dist/<model>-<quant>/`` as one app model; ``override`` is its package-config entry, if any."""
    entry = dict(read_json(dist / "bundle" / "mlc-app-config.json", "app config")["model_list"][0])
    mid = entry["model_id"]
    tars = sorted((dist / "lib").glob(f"{mid}-iphone.tar"))
    if not tars:
        raise WorkflowError(f"{dist} has no iphone library lib/{mid}-iphone.tar; the app needs target iphone (or extra_targets: [iphone])")
    if override:
        url = None if override["bundle_weight"] else model_url_of(override["model"])
        entry = app_entry(mid, entry["model_lib"], override["estimated_vram_bytes"], url)
    weights = dist / "bundle" / mid
    return AppModel(entry, tars[0], weights, read_json(weights / "mlc-chat-config.json", "chat config"))


def make_app(out: Path, bundles: Sequence[Path], overrides: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The app directory ``mlc_llm package`` would write for these bundles, validated; returns its manifest."""
    check_output(out, "app", bundles)
    models = [read_bundle(d, o) for d, o in zip(bundles, overrides or [None] * len(bundles), strict=True)]
    libs = [m.entry["model_lib"] for m in models]
    dupes = sorted({lib for lib in libs if libs.count(lib) > 1})
    if dupes:
        raise WorkflowError(f"two bundles share model_lib {', '.join(dupes)}; the app could not tell them apart")
    fit = {}
    for m in models:
        computed = estimate_vram(library_metadata(m.iphone_lib), m.chat_config).total
        mid = m.entry["model_id"]
        if m.entry["estimated_vram_bytes"] < computed:
            print(f"warning: {mid}: estimated_vram_bytes {m.entry['estimated_vram_bytes']} is below the library's own estimate {computed}", file=sys.stderr)
        for line in fit_warnings(mid, max(computed, m.entry["estimated_vram_bytes"])):
            print(line, file=sys.stderr)
        fit[mid] = {"estimated_vram_bytes": m.entry["estimated_vram_bytes"], "library_estimate": computed, "devices": fit_table(computed)}
    with atomic_path(out, "app", bundles) as tmp:
        objects = make_model_lib_archive(tmp / "lib" / APP_LIB_NAME, [(m.entry["model_lib"], m.iphone_lib) for m in models],
                                         [m.entry for m in models])
        check_imports(objects, str(out / "lib" / APP_LIB_NAME))
        for m in models:
            if "model_path" in m.entry:
                for f in sorted(p for p in m.weights.rglob("*") if p.is_file()):
                    _place(f, tmp / "bundle" / m.entry["model_id"] / f.relative_to(m.weights))
        write_json(tmp / "bundle" / "mlc-app-config.json", {"model_list": [m.entry for m in models]})
        pkg_entries = [{**m.entry, "model_url": m.entry.get("model_url")} for m in models]
        write_json(tmp / "mlc-package-config.json", package_config(
            pkg_entries, {m.entry["model_id"]: m.chat_config for m in models},
            {m.entry["model_lib"]: f"../{m.entry['model_id']}/lib/{m.iphone_lib.name}" for m in models},
        ))
        manifest = {
            "app": [m.entry["model_id"] for m in models],
            "model_libs": available_model_libs(read_archive(tmp / "lib" / APP_LIB_NAME).global_symbols()),
            "runtime_abi": runtime_abi(objects),
            "fit": fit,
            "tools": tool_versions(),
            "files": _files(tmp),
        }
        write_json(tmp / "MANIFEST.json", manifest)
    return manifest


# ------------------------------------------------------------------ CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    a = sub.add_parser("app-config")
    a.add_argument("--model-id", required=True)
    a.add_argument("--model-lib", required=True)
    a.add_argument("--model-url", help="download-on-device URL; without it the weights are bundled into the app")
    a.add_argument("--lib", required=True, help="the compiled library whose _metadata gives estimated_vram_bytes")
    a.add_argument("--chat-config", help="mlc-chat-config.json, for symbolic dimensions in the metadata")
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
    c = sub.add_parser("app", help="the iOS app directory: lib/libmodel_iphone.a, bundle/, mlc-package-config.json")
    c.add_argument("--bundle", action="append", required=True, help="a built dist/<model>-<quant> directory (repeat)")
    c.add_argument("--package-config", help="an mlc-package-config.json whose entries (in --bundle order) set bundle_weight, model and estimated_vram_bytes")
    c.add_argument("-o", "--output", required=True)
    v = sub.add_parser("vram", help="estimated_vram_bytes of a compiled library, its three terms and the iPhone fit")
    v.add_argument("lib", help="a compiled model library (.tar or .so)")
    v.add_argument("--chat-config", help="mlc-chat-config.json, for symbolic dimensions in the metadata")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.verb == "app-config":
        cfg = read_json(a.chat_config, "chat config") if a.chat_config else None
        seed, mlc = app_configs(a.model_id, a.model_lib, a.model_url, Path(a.lib), cfg)
        for out in (a.seed_out, a.mlc_out):
            check_output(out, None, [a.lib, *([a.chat_config] if a.chat_config else [])])
        write_json(a.seed_out, seed)
        write_json(a.mlc_out, mlc)
        return 0
    if a.verb == "vram":
        est = estimate_vram(library_metadata(Path(a.lib)), read_json(a.chat_config, "chat config") if a.chat_config else None)
        report = {"library": a.lib, "estimated_vram_bytes": est.total, "params": est.params, "temporary": est.temporary,
                  "kv_cache": est.kv_cache, "context_window_size": est.context_window_size, "devices": fit_table(est.total)}
        print(json.dumps(report, indent=2))
        return 0
    if a.verb == "app":
        overrides = None
        if a.package_config:
            entries = read_package_config(Path(a.package_config))
            by_id = {e["model_id"]: e for e in entries}
            overrides = [by_id.get(Path(d).name) for d in a.bundle]
        manifest = make_app(Path(a.output), [Path(d) for d in a.bundle], overrides)
        print(f"{a.output}: {len(manifest['app'])} models, model_libs {manifest['model_libs']}")
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
