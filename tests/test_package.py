"""The iOS app contract: model_lib names, libmodel_iphone.a, app configs, the memory estimate, the runtime ABI.

Everything is checked the way MLC-LLM (commit 79d603f) checks or uses it: ``mlc_llm package``'s
validation (interface/package.py), the runtime's system-library lookup (cpp/serve/function_table.cc),
``model_metadata``'s estimate. Symbol tables are read by ``neox_mlc.staticlib`` and cross-checked with
Debian's LLVM tools (``llvm-nm``, ``llvm-ar``, ``ld64.lld``, ``llvm-mc``; installed by .ci/run), which
read Mach-O as Apple's toolchain does; a test needing one that is missing says so and skips.
"""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from neox_mlc import layout
from neox_mlc.common import WorkflowError
from neox_mlc.package import (
    LIBRARY_BIN_SUFFIX,
    app_entry,
    check_imports,
    check_model_lib,
    estimate_vram,
    fit_table,
    fit_warnings,
    library_metadata,
    make_model_lib_archive,
    seed_app_config,
    tvm_ffi_c_api,
)
from neox_mlc.package_config import match_package_config, read_package_config
from neox_mlc.staticlib import MachObject, read_archive, read_macho, tar_objects, write_archive

# Model names as users write them: dashes, dots, digits (and a quantization suffix with a digit).
NAMES = [("line-3.6b-v2.1-sft", "q4f16_0"), ("Qwen2.5-0.5B", "q0f16")]


def tool(name: str) -> str:
    versioned = sorted(glob.glob(f"/usr/bin/{name}-[0-9]*"), key=lambda p: int(p.rsplit("-", 1)[1]))  # Debian: ld64.lld-14
    path = shutil.which(name) or (versioned[-1] if versioned else None)
    if path is None:
        pytest.skip(f"{name} not installed (Debian packages llvm, lld; .ci/run installs them)")
    return path


def run(*cmd: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"
    return proc.stdout


def llvm_nm_defined(path: Path) -> set[str]:
    """``nm -gU`` as MLC runs it (tvm.support.cc.get_global_symbol_section_map), with LLVM's nm."""
    out = run(tool("llvm-nm"), "-gU", str(path))
    return {parts[-1] for line in out.splitlines() if len(parts := line.split()) == 3}


@pytest.fixture(scope="module")
def iphone_libs(tmp_path_factory, fixtures_dir):
    """(model, quant) -> (iphone tar, metadata returned by the compiler), compiled as the workflow does."""
    from neox_mlc.compile import build

    root = tmp_path_factory.mktemp("iphone")
    out = {}
    for model, quant in NAMES:
        tar = root / Path(layout.library(model, quant, "iphone")).name
        meta = build(fixtures_dir / quant / "mlc-chat-config.json", "iphone", tar, layout.system_lib_prefix(model, quant))
        out[(model, quant)] = (tar, meta)
    return out


def defined_symbols(tar: Path) -> set[str]:
    return set().union(*(read_macho(data, name).defined for name, data in tar_objects(tar)))


# ------------------------------------------------------------------ model_lib


@pytest.mark.parametrize("model,quant", [*NAMES, ("tiny-neox-ja", "q4f16_1"), ("a.b_c-9", "q3f16_1")])
def test_model_lib_is_the_prefix_the_runtime_looks_up(model, quant):
    lib = layout.model_lib(model, quant)
    # function_table.cc: SystemLib(model_lib with '-' -> '_' + "_"); jit.py compiles with model_lib + "_"
    assert layout.runtime_system_lib(lib) == layout.system_lib_prefix(model, quant) == lib + "_"
    assert not lib.endswith("_") and set(lib) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


@pytest.mark.parametrize("model,quant", NAMES)
def test_compiled_library_exports_what_mlc_validates(model, quant, iphone_libs):
    """MLC's check: model_lib ('-'→'_') + '___tvm_ffi__library_bin' among the library's global symbols."""
    tar, _ = iphone_libs[(model, quant)]
    lib = layout.model_lib(model, quant)
    ours = defined_symbols(tar)
    check_model_lib(lib, layout.bundle_id(model, quant), ours, str(tar))
    assert "_" + lib + LIBRARY_BIN_SUFFIX in ours
    # the same set as LLVM's nm over the extracted objects
    extracted = tar.parent / f"{tar.stem}-objects"
    extracted.mkdir(exist_ok=True)
    llvm = set()
    for name, data in tar_objects(tar):
        (extracted / name).write_bytes(data)
        llvm |= llvm_nm_defined(extracted / name)
    assert llvm == ours
    # The spelling the app configs had before (the prefix with its trailing '_') names no library.
    with pytest.raises(WorkflowError, match=rf"model_lib {lib}_ .* model_libs found: \['{lib}'\]"):
        check_model_lib(lib + "_", "x", ours, str(tar))


# ------------------------------------------------------------------ libmodel_iphone.a


@pytest.fixture(scope="module")
def app_archive(iphone_libs, tmp_path_factory):
    out = tmp_path_factory.mktemp("app") / "libmodel_iphone.a"
    libs = [(layout.model_lib(m, q), tar) for (m, q), (tar, _) in iphone_libs.items()]
    entries = [{"model_id": layout.bundle_id(m, q), "model_lib": layout.model_lib(m, q)} for m, q in iphone_libs]
    objects = make_model_lib_archive(out, libs, entries)
    return out, objects, libs


def test_archive_is_a_darwin_ar_of_arm64_objects_with_a_table_of_contents(app_archive, tmp_path):
    out, objects, libs = app_archive
    assert "current ar archive" in run(tool("file"), str(out))
    members = run(tool("llvm-ar"), "t", str(out)).split()
    assert members == [o.name for o in objects] and len(set(members)) == len(members)
    assert all(m.startswith(tuple(lib for lib, _ in libs)) for m in members)
    # every member comes back byte-identical and is an arm64 Mach-O object
    run(tool("llvm-ar"), "x", str(out), cwd=tmp_path)
    originals = {f"{lib}_{n}" if not n.startswith(lib) else n: d for lib, tar in libs for n, d in tar_objects(tar)}
    for name in members:
        assert (tmp_path / name).read_bytes() == originals[name]
        assert "Mach-O 64-bit arm64 object" in run(tool("file"), str(tmp_path / name))
    # our table of contents is the one LLVM reads, and lists every defined external symbol
    armap = run(tool("llvm-nm"), "--print-armap", str(out)).split("\n\n")[0]
    pairs = {tuple(line.split(" in ")) for line in armap.splitlines()[1:] if " in " in line}
    ours = read_archive(out)
    assert pairs == {(sym, member) for sym, where in ours.toc.items() for member in where}
    assert set(ours.toc) == ours.global_symbols() == llvm_nm_defined(out)


def test_a_mach_o_linker_finds_every_model_through_the_archive_index(app_archive, tmp_path):
    """ld64.lld (LLVM's Mach-O linker) resolves each model's library symbol through the table of
    contents, as Xcode's linker does, and links all models together with -all_load (the MLC app's
    flag) without duplicate symbols; only TVM-FFI symbols stay undefined for the app's runtime."""
    out, _, libs = app_archive
    ld = tool("ld64.lld")
    refs = "".join(f"    .quad _{lib}{LIBRARY_BIN_SUFFIX}\n" for lib, _ in libs)
    (tmp_path / "ref.s").write_text(f"    .section __DATA,__data\n    .globl _probe\n    .p2align 3\n_probe:\n{refs}")
    run(tool("llvm-mc"), "-triple", "arm64-apple-ios14.0", "-filetype=obj", str(tmp_path / "ref.s"), "-o", str(tmp_path / "ref.o"))
    common = ["-arch", "arm64", "-platform_version", "ios", "14.0", "14.0", "-dylib", "-undefined", "dynamic_lookup"]
    run(ld, *common, str(tmp_path / "ref.o"), str(out), "-o", str(tmp_path / "by-index.dylib"))
    exported = llvm_nm_defined(tmp_path / "by-index.dylib")
    assert {f"_{lib}{LIBRARY_BIN_SUFFIX}" for lib, _ in libs} <= exported
    run(ld, *common, "-all_load", str(out), "-o", str(tmp_path / "all.dylib"))
    undefined = set(run(tool("llvm-nm"), "-u", str(tmp_path / "all.dylib")).split()) - {"dyld_stub_binder"}
    assert undefined and undefined <= tvm_ffi_c_api()


def test_archive_validation_names_the_missing_lib_and_those_found(iphone_libs, tmp_path):
    (model, quant), (tar, _) = next(iter(iphone_libs.items()))
    lib = layout.model_lib(model, quant)
    with pytest.raises(WorkflowError) as err:
        make_model_lib_archive(tmp_path / "libmodel_iphone.a", [(lib, tar)], [{"model_id": "other", "model_lib": "other_q4f16_1"}])
    assert str(err.value) == f"model_lib other_q4f16_1 (model_id other) is not in {tmp_path / 'libmodel_iphone.a'}; model_libs found: ['{lib}']"
    assert not (tmp_path / "libmodel_iphone.a").exists()  # nothing half-valid is left behind


def test_archive_refuses_duplicate_members_and_strong_symbols(iphone_libs, tmp_path):
    from neox_mlc.package import check_duplicates

    tar, _ = next(iter(iphone_libs.values()))
    objs = tar_objects(tar)
    with pytest.raises(WorkflowError, match="unique names; repeated: " + objs[0][0]):
        write_archive(tmp_path / "x.a", [objs[0], objs[0]])
    a = MachObject("a.o", frozenset({"_f", "_w"}), frozenset({"_w"}), frozenset())
    b = MachObject("b.o", frozenset({"_g", "_w"}), frozenset({"_w"}), frozenset())
    check_duplicates([a, b], "lib")  # weak definitions may repeat (TVM's ___extendhfsf2 in every model)
    c = MachObject("c.o", frozenset({"_f"}), frozenset(), frozenset())
    with pytest.raises(WorkflowError, match="symbol _f is defined in both a.o and c.o"):
        check_duplicates([a, c], "lib")
    with pytest.raises(WorkflowError, match="not a 64-bit little-endian Mach-O object"):
        read_macho(b"\x7fELF" + bytes(60), "x.o")


# ------------------------------------------------------------------ the estimate and the fit


def test_metadata_is_read_back_from_the_iphone_library(iphone_libs):
    for tar, meta in iphone_libs.values():
        assert library_metadata(tar) == json.loads(json.dumps(meta))


def test_estimate_follows_mlc_on_mlcs_own_metadata(fixtures_dir):
    """On the metadata MLC-LLM's compiler wrote (lib-interface.json): params as loaded (float32 stored
    as bfloat16 counts 4 bytes), the largest planned temporary, K and V for the context window."""
    for quant in ("q0f16", "q4f16_1"):
        meta = json.loads((fixtures_dir / quant / "lib-interface.json").read_text())["metadata"]
        assert "vocab_size" in json.dumps(meta["params"])  # MLC writes symbolic dimensions
        with pytest.raises(WorkflowError, match="shape names 'vocab_size'"):
            estimate_vram(meta)
        cache = json.loads((fixtures_dir / quant / "tensor-cache.json").read_text())
        loaded = sum(r["nbytes"] * (2 if r["dtype"] == "float32" else 1) for shard in cache["records"] for r in shard["records"])
        est = estimate_vram(meta, json.loads((fixtures_dir / quant / "mlc-chat-config.json").read_text()))
        assert est.params == loaded
        assert est.temporary == max(meta["memory_usage"].values()) == meta["memory_usage"]["batch_prefill"]
        assert est.kv_cache == 2 * 2 * 4 * 16 * 2 * 768  # K+V × layers × heads × head_dim × float16 × window
        assert est.total == est.params + est.temporary + est.kv_cache


def test_fit_warnings_name_the_devices_that_cannot_hold_the_model():
    assert fit_warnings("tiny", 2_000_000) == []
    q4 = 2_574_176_256  # the 3.6B q4f16_0 bundle (README)
    lines = fit_warnings("line-q4f16_0", q4)
    assert len(lines) == 1 and "iPhone 12 mini" in lines[0] and "does not fit even with" in lines[0]
    rows = fit_table(q4)
    assert [r["fits"] for r in rows] == [False, True, True, True]
    q0 = 7_910_117_376  # the 3.6B q0f16 bundle
    assert not any(r["fits_with_entitlement"] for r in fit_table(q0)) and len(fit_warnings("q0", q0)) == 4


# ------------------------------------------------------------------ app config entries


def test_entries_are_written_as_mlc_package_writes_them():
    bundled = app_entry("m-q4f16_0", "m_q4f16_0", 123, None)
    assert list(bundled) == ["model_id", "model_lib", "model_path", "estimated_vram_bytes"]
    assert bundled["model_path"] == "m-q4f16_0"
    download = app_entry("m-q4f16_0", "m_q4f16_0", 123, "https://huggingface.co/u/m-q4f16_0-MLC")
    assert list(download) == ["model_id", "model_lib", "model_url", "estimated_vram_bytes"]
    assert seed_app_config("m-q4f16_0", None)["model_list"] == [{"model_url": "", "local_id": "m-q4f16_0"}]
    assert seed_app_config("m", "https://x/y")["model_list"][0]["model_url"] == "https://x/y"


def test_imports_outside_the_tvm_ffi_c_api_are_refused(iphone_libs):
    api = tvm_ffi_c_api()
    assert {"_TVMFFIFunctionCall", "_TVMFFIEnvModRegisterSystemLibSymbol"} <= api and len(api) > 40
    for tar, _ in iphone_libs.values():
        objects = [read_macho(d, n) for n, d in tar_objects(tar)]
        check_imports(objects, str(tar))
        assert set().union(*(o.undefined for o in objects)) <= api
    foreign = MachObject("x.o", frozenset(), frozenset(), frozenset({"_TVMFFIFunctionCall", "_TVMBackendAllocWorkspace"}))
    with pytest.raises(WorkflowError, match="imports _TVMBackendAllocWorkspace, outside the TVM-FFI C API"):
        check_imports([foreign], "lib")


# ------------------------------------------------------------------ mlc-package-config.json

GOOD = {
    "device": "iphone",
    "model_list": [
        {"model": "HF://me/tiny-neox-ja-q4f16_0-MLC", "model_id": "tiny-neox-ja-q4f16_0", "estimated_vram_bytes": 3000000000,
         "overrides": {"context_window_size": 256, "prefill_chunk_size": 256}},
        {"model": "bundle/tiny-neox-ja-q0f16", "model_id": "tiny-neox-ja-q0f16", "estimated_vram_bytes": 5000000,
         "bundle_weight": True, "model_lib": "tiny_neox_ja_q0f16"},
    ],
}


def write(tmp_path: Path, doc) -> Path:
    path = tmp_path / "mlc-package-config.json"
    path.write_text(json.dumps(doc))
    return path


def test_package_config_is_read_and_matched_to_bundles(tmp_path):
    entries = read_package_config(write(tmp_path, GOOD))
    assert [e["bundle_weight"] for e in entries] == [False, True]
    bundles = {layout.bundle_id("tiny-neox-ja", q): ("tiny-neox-ja", q) for q in ("q0f16", "q4f16_0")}
    libs = {k: layout.model_lib(*v) for k, v in bundles.items()}
    compiled = {"context_window_size": 256, "prefill_chunk_size": 256}
    assert match_package_config(entries, bundles, libs, compiled) == [("tiny-neox-ja", "q4f16_0"), ("tiny-neox-ja", "q0f16")]
    with pytest.raises(WorkflowError, match=r"override context_window_size=256 .* differs from the compiled 512"):
        match_package_config(entries, bundles, libs, {**compiled, "context_window_size": 512})
    wrong = [{**entries[1], "model_lib": "tiny_neox_ja_q0f16_"}]
    with pytest.raises(WorkflowError, match="model_lib 'tiny_neox_ja_q0f16_' for model_id 'tiny-neox-ja-q0f16': this workflow compiles it as 'tiny_neox_ja_q0f16'"):
        match_package_config(wrong, bundles, libs, compiled)
    with pytest.raises(WorkflowError, match="model_id 'tiny-neox-ja-q4f16_0' in the package config names no bundle; allowed: tiny-neox-ja-q0f16"):
        match_package_config(entries, {k: v for k, v in bundles.items() if "q0" in k}, libs, compiled)


def _entry(**kw):
    return {"device": "iphone", "model_list": [{"model": "HF://a/b", "model_id": "m", "estimated_vram_bytes": 1, **kw}]}


@pytest.mark.parametrize("doc,message", [
    ([], 'expected a dict with field "model_list"; got list'),
    ({"model_list": []}, 'field "device" is required; allowed: iphone'),
    ({"device": "android", "model_list": []}, "device 'android' is not supported here; allowed: iphone"),
    ({"device": "iphone", "model_list": {}}, '"model_list" must be a list; got dict'),
    ({"device": "iphone", "model_list": ["m"]}, "model_list[0] must be a dict; got str"),
    ({"device": "iphone", "model_list": [{"model": "HF://a/b", "model_id": "m"}]}, 'lacks "estimated_vram_bytes"'),
    (_entry(model_id=7), "model_id = 7 must be a string"),
    (_entry(bundle_weight="yes"), "bundle_weight = 'yes' must be a boolean"),
    (_entry(overrides=[]), "overrides = [] must be a dict"),
    (_entry(model_lib=3), "model_lib = 3 must be a string"),
    (_entry(estimated_vram_bytes="3GB"), "estimated_vram_bytes = '3GB' must be a positive integer"),
    (_entry(model="dist/m/bundle/m"), 'model "dist/m/bundle/m" is a local path; set "bundle_weight": true for it'),
    ({"device": "iphone", "model_list": []}, '"model_list" is empty'),
])
def test_package_config_entries_get_mlcs_checks_as_one_line(tmp_path, doc, message):
    with pytest.raises(WorkflowError) as err:
        read_package_config(write(tmp_path, doc))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_vram_verb_prints_the_terms_and_the_fit(iphone_libs, capsys):
    from neox_mlc.package import main

    tar, meta = iphone_libs[NAMES[0]]
    assert main(["vram", str(tar)]) == 0
    report = json.loads(capsys.readouterr().out)
    est = estimate_vram(meta)
    assert report["estimated_vram_bytes"] == est.total == report["params"] + report["temporary"] + report["kv_cache"]
    assert len(report["devices"]) == 4 and all(row["fits"] for row in report["devices"])
