"""The Snakemake graph: dry-run plans, the offline tiny build, reruns and bad input.

Every plan assertion reads Snakemake's own dry-run job table (``snakemake -n``), never mtimes set by
hand. The tiny build runs once per module in a private copy of the workflow.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neox_mlc.common import OUTPUT_MARK, sha256_file

from conftest import WORKFLOW_SOURCES, copy_workflow, run_snakemake

REAL = "japanese-large-lm-3.6b-instruction-sft"
TINY = "tiny-neox-ja"


def planned_jobs(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count} (empty when nothing is to be done)."""
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:", 1)[1]
    jobs = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m or m.group(1) == "total":
            break
        jobs[m.group(1)] = int(m.group(2))
    return jobs


@pytest.fixture()
def wf(tmp_path):
    return copy_workflow(tmp_path)


def test_real_model_dry_run_plans_every_step_offline(wf, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = run_snakemake(wf, "-n", f"dist/{REAL}-q4f16_0")
    assert planned_jobs(proc.stdout) == {
        "model_config": 1, "fetch_model": 1, "tokenizer": 1, "weight_plan": 1, "weights_index": 1,
        "gen_config": 1, "compile": 1, "app_config": 1, "package": 1,
    }
    assert f"build/{REAL}/q4f16_0/lib/{REAL}-q4f16_0-iphone.tar" in proc.stdout
    assert not (wf / "resources").exists() and not (wf / "build").exists()


def test_real_default_target_and_command_line_knobs(wf):
    jobs = planned_jobs(run_snakemake(wf, "-n").stdout)
    assert jobs == {
        "model_config": 1, "fetch_model": 1, "tokenizer": 1, "weight_plan": 2, "weights_index": 2,
        "gen_config": 2, "compile": 2, "app_config": 2, "package": 2, "app": 1, "all": 1,
    }
    out = run_snakemake(wf, "-n", "-p", "--config", "target=metal", "max_seq_len=512", "quantizations=[q4f16_1]").stdout
    assert planned_jobs(out)["package"] == 1
    assert f"{REAL}-q4f16_1-metal.tar" in out
    assert "--context-window-size 512" in out


SENTINEL = "hf_SENTINELtokenNEVERtoBEwritten0123456789"


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    wf = copy_workflow(tmp_path_factory.mktemp("tiny-wf"))
    run_snakemake(wf, "--configfile", "config/tiny.yaml", env={"HF_TOKEN": SENTINEL})
    return wf


def test_hf_token_never_written_anywhere(tiny_build):
    sources = set(WORKFLOW_SOURCES)
    scanned = 0
    for path in tiny_build.rglob("*"):
        rel = path.relative_to(tiny_build)
        if path.is_file() and rel.parts[0] not in sources:
            scanned += 1
            assert SENTINEL.encode() not in path.read_bytes(), rel
    assert scanned > 50  # logs, metadata (.snakemake), build outputs, bundles


def test_tiny_build_produces_complete_bundles(tiny_build):
    for quant in ("q0f16", "q4f16_0"):
        dist = tiny_build / "dist" / f"{TINY}-{quant}"
        manifest = json.loads((dist / "MANIFEST.json").read_text())
        # unlisted: the manifest itself, Snakemake's directory-output stamp and the package step's output marker
        files = {str(p.relative_to(dist)) for p in dist.rglob("*") if p.is_file()} - {"MANIFEST.json", ".snakemake_timestamp", OUTPUT_MARK}
        assert set(manifest["files"]) == files
        for rel, rec in manifest["files"].items():
            assert sha256_file(dist / rel) == rec["sha256"] and (dist / rel).stat().st_size == rec["size"]
        assert manifest["provenance"]["quantization"] == quant
        assert manifest["provenance"]["max_seq_len"] == 256
        assert manifest["provenance"]["targets"] == ["iphone", "llvm"]
        assert "apache-tvm" in manifest["tools"] and "transformers" in manifest["tools"]
        model_dir = dist / "bundle" / f"{TINY}-{quant}"
        for name in ("tensor-cache.json", "params_shard_0.bin", "mlc-chat-config.json", "tokenizer.json"):
            assert (model_dir / name).is_file(), name
        assert (dist / "lib" / f"{TINY}-{quant}-iphone.tar").is_file()
        assert (dist / "lib" / f"{TINY}-{quant}-llvm.so").is_file()
        seed = json.loads((dist / "app-config.json").read_text())
        assert seed["model_libs"] == [f"{TINY}-{quant}"]
        assert seed["model_list"][0]["local_id"] == f"{TINY}-{quant}" and seed["add_model_samples"] == []
        app = json.loads((dist / "bundle" / "mlc-app-config.json").read_text())["model_list"][0]
        assert (dist / "bundle" / app["model_path"] / "mlc-chat-config.json").is_file()
        params_bytes = json.loads((model_dir / "tensor-cache.json").read_text())["metadata"]["ParamBytes"]
        assert app["estimated_vram_bytes"] > params_bytes
        cfg = json.loads((model_dir / "mlc-chat-config.json").read_text())
        assert cfg["context_window_size"] == 256 and cfg["conv_template"]["name"] == "line_llm"


def test_rerun_nothing_when_up_to_date(tiny_build):
    assert planned_jobs(run_snakemake(tiny_build, "-n", "--configfile", "config/tiny.yaml").stdout) == {}


def test_max_seq_len_change_reruns_config_compile_and_package_only(tiny_build):
    out = run_snakemake(tiny_build, "-n", "--configfile", "config/tiny.yaml", "--config", "max_seq_len=128").stdout
    # app_config reruns too: its estimated_vram_bytes includes the KV cache of the context window.
    assert planned_jobs(out) == {"gen_config": 2, "compile": 4, "app_config": 2, "package": 2, "app": 1, "all": 1}


def test_host_cpu_change_rebuilds_only_the_host_libraries(tiny_build):
    out = run_snakemake(tiny_build, "-n", "--configfile", "config/tiny.yaml", "--config", "host_cpu=x86-64-v3").stdout
    # the iphone libraries (and the app configs read from them) do not depend on the host CPU
    assert planned_jobs(out) == {"compile": 2, "package": 2, "app": 1, "all": 1}
    assert "-llvm.so" in out and "-iphone.tar" not in out.split("rule package")[0]


def test_unknown_host_cpu_is_one_line_before_any_work(tiny_build, tmp_path):
    import subprocess
    import sys

    chat = tiny_build / "build" / TINY / "q4f16_0" / "mlc-chat-config.json"
    proc = subprocess.run(
        [sys.executable, "scripts/compile.py", str(chat), "--device", "llvm", "--host-cpu", "pentium-9000", "-o", str(tmp_path / "x.so")],
        cwd=tiny_build, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: host_cpu 'pentium-9000' is not a CPU LLVM knows; allowed: auto or an LLVM -mcpu name such as x86-64-v3, x86-64-v4, znver4"
    ]
    assert not (tmp_path / "x.so").exists()


def test_new_quantization_reuses_fetch_and_tokenizer(tiny_build):
    out = run_snakemake(tiny_build, "-n", "--configfile", "config/tiny.yaml", "--config", "quantizations=[q0f16,q4f16_0,q4f16_1]").stdout
    assert planned_jobs(out) == {
        "weight_plan": 1, "weights_index": 1, "gen_config": 1, "compile": 2, "app_config": 1, "package": 1, "app": 1, "all": 1,
    }
    assert "q4f16_1" in out and "fetch_model" not in out and "rule tokenizer" not in out


def test_template_change_reruns_chat_config_and_dependants(tiny_build):
    tiny = yaml.safe_load((tiny_build / "config" / "tiny.yaml").read_text())
    tiny["conv_templates"] = {"line_llm": {**yaml.safe_load((tiny_build / "config.yaml").read_text())["conv_templates"]["line_llm"], "stop_str": ["</s>", "<NL>"]}}
    (tiny_build / "changed.yaml").write_text(yaml.safe_dump(tiny, allow_unicode=True))
    out = run_snakemake(tiny_build, "-n", "--configfile", "changed.yaml").stdout
    assert planned_jobs(out) == {"gen_config": 2, "compile": 4, "app_config": 2, "package": 2, "app": 1, "all": 1}


def test_deleted_shard_reruns_only_weights_and_dependants(tiny_build):
    shard = tiny_build / "build" / TINY / "q4f16_0" / "params" / "params_shard_0.bin"
    manifest = json.loads((tiny_build / "dist" / f"{TINY}-q4f16_0" / "MANIFEST.json").read_text())
    shard.unlink()
    out = run_snakemake(tiny_build, "-n", "--configfile", "config/tiny.yaml").stdout
    # the app configs do not depend on the weights (their estimate is the library's), the bundles do
    assert planned_jobs(out) == {"convert_shard": 1, "weights_index": 1, "package": 1, "app": 1, "all": 1}
    run_snakemake(tiny_build, "--configfile", "config/tiny.yaml")
    again = json.loads((tiny_build / "dist" / f"{TINY}-q4f16_0" / "MANIFEST.json").read_text())
    assert {k: v["sha256"] for k, v in again["files"].items()} == {k: v["sha256"] for k, v in manifest["files"].items()}


def test_chat_runner_answers_from_the_tiny_bundle(tiny_build):
    import subprocess
    import sys

    proc = subprocess.run(
        [str(Path(sys.executable).parent / "neox-mlc"), "chat", f"dist/{TINY}-q0f16", "--prompt", "日本の首都はどこですか?", "--max-tokens", "12"],
        cwd=tiny_build, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_app_configs_name_the_library_the_runtime_finds(tiny_build):
    """Each bundle's app configs: model_lib is what the runtime asks TVM-FFI for, and the iphone library
    defines it exactly as `mlc_llm package` validates (model_lib + '___tvm_ffi__library_bin'); the
    weights are bundled, so the entry has model_path and no model_url, and the seed's model_url is ""."""
    from neox_mlc.package import LIBRARY_BIN_SUFFIX, estimate_vram, library_metadata
    from neox_mlc.staticlib import read_macho, tar_objects

    for quant in ("q0f16", "q4f16_0"):
        dist = tiny_build / "dist" / f"{TINY}-{quant}"
        entry = json.loads((dist / "bundle" / "mlc-app-config.json").read_text())["model_list"][0]
        assert list(entry) == ["model_id", "model_lib", "model_path", "estimated_vram_bytes"]
        tar = dist / "lib" / f"{TINY}-{quant}-iphone.tar"
        defined = set().union(*(read_macho(d, n).defined for n, d in tar_objects(tar)))
        assert "_" + entry["model_lib"].replace("-", "_") + LIBRARY_BIN_SUFFIX in defined
        assert entry["model_lib"].replace("-", "_") + "_" == f"tiny_neox_ja_{quant}_"  # function_table.cc's lookup
        meta = library_metadata(tar)
        assert entry["estimated_vram_bytes"] == estimate_vram(meta).total
        seed = json.loads((dist / "app-config.json").read_text())
        assert seed["model_list"] == [{"model_url": "", "local_id": f"{TINY}-{quant}"}]
        assert json.loads((dist / "MANIFEST.json").read_text())["runtime_abi"]["imports"]


def test_tiny_app_is_laid_out_as_mlc_package_lays_it_out(tiny_build):
    from neox_mlc.package import available_model_libs, tvm_ffi_c_api
    from neox_mlc.package_config import read_package_config
    from neox_mlc.staticlib import read_archive

    app = tiny_build / "dist" / "app"
    archive = read_archive(app / "lib" / "libmodel_iphone.a")
    assert available_model_libs(set(archive.toc)) == ["tiny_neox_ja_q0f16", "tiny_neox_ja_q4f16_0"]
    entries = json.loads((app / "bundle" / "mlc-app-config.json").read_text())["model_list"]
    for quant, entry in zip(("q0f16", "q4f16_0"), entries, strict=True):
        bid = f"{TINY}-{quant}"
        assert entry == json.loads((tiny_build / "dist" / bid / "bundle" / "mlc-app-config.json").read_text())["model_list"][0]
        own = tiny_build / "dist" / bid / "bundle" / bid
        assert sorted(p.name for p in (app / "bundle" / bid).iterdir()) == sorted(p.name for p in own.iterdir())
        assert sha256_file(app / "bundle" / bid / "params_shard_0.bin") == sha256_file(own / "params_shard_0.bin")
    manifest = json.loads((app / "MANIFEST.json").read_text())
    files = {str(p.relative_to(app)) for p in app.rglob("*") if p.is_file()} - {"MANIFEST.json", ".snakemake_timestamp", OUTPUT_MARK}
    assert set(manifest["files"]) == files
    assert set(manifest["runtime_abi"]["imports"]) <= tvm_ffi_c_api()
    assert manifest["runtime_abi"]["mlc_llm_commit"] == "79d603f" and manifest["runtime_abi"]["apache_tvm"] == "0.26.0"
    assert all(f["devices"][0]["fits"] for f in manifest["fit"].values())  # a tiny model fits every iPhone
    # the package config written beside it passes MLC's own checks and points at files that exist
    pkg = read_package_config(app / "mlc-package-config.json")
    assert [e["model_id"] for e in pkg] == [f"{TINY}-q0f16", f"{TINY}-q4f16_0"] and all(e["bundle_weight"] for e in pkg)
    assert all((app / e["model"] / "mlc-chat-config.json").is_file() for e in pkg)
    libs = json.loads((app / "mlc-package-config.json").read_text())["model_lib_path_for_prepare_libs"]
    assert all((app / path).is_file() for path in libs.values())


def test_app_from_an_mlc_package_config_through_the_cli(tiny_build, tmp_path):
    """One entry downloaded on the device (model_url, no weights in the app), one bundled; MLC's
    estimated_vram_bytes is kept as the user wrote it."""
    cfg = tmp_path / "mlc-package-config.json"
    cfg.write_text(json.dumps({"device": "iphone", "model_list": [
        {"model": f"HF://me/{TINY}-q4f16_0-MLC", "model_id": f"{TINY}-q4f16_0", "estimated_vram_bytes": 3000000000},
        {"model": "anything/local", "model_id": f"{TINY}-q0f16", "estimated_vram_bytes": 5000000, "bundle_weight": True},
    ]}))
    out = tmp_path / "app"
    cli = str(Path(sys.executable).parent / "neox-mlc")
    args = [cli, "package", "app", "--bundle", f"dist/{TINY}-q4f16_0", "--bundle", f"dist/{TINY}-q0f16", "--package-config", str(cfg), "-o", str(out)]
    proc = subprocess.run(args, cwd=tiny_build, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    entries = json.loads((out / "bundle" / "mlc-app-config.json").read_text())["model_list"]
    assert entries[0] == {"model_id": f"{TINY}-q4f16_0", "model_lib": "tiny_neox_ja_q4f16_0",
                          "model_url": f"https://huggingface.co/me/{TINY}-q4f16_0-MLC", "estimated_vram_bytes": 3000000000}
    assert entries[1]["model_path"] == f"{TINY}-q0f16" and entries[1]["estimated_vram_bytes"] == 5000000
    assert sorted(p.name for p in (out / "bundle").iterdir()) == ["mlc-app-config.json", f"{TINY}-q0f16"]
    cfg.write_text(json.dumps({"device": "iphone", "model_list": [{"model": "x/y", "model_id": f"{TINY}-q0f16", "estimated_vram_bytes": 1}]}))
    proc = subprocess.run(args, cwd=tiny_build, capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f'error: {cfg}: model_list[0]: model "x/y" is a local path; set "bundle_weight": true for it'


def test_download_on_device_is_a_knob(wf):
    # The real model's default: weights in the app, so no download URL reaches the app configs.
    assert "--model-url" not in run_snakemake(wf, "-n", "-p").stdout
    err = _fails(wf, "--configfile", "config/tiny.yaml", "--config", "bundle_weight=False")
    assert f"bundle_weight False (download on device) needs models.{TINY}.model_url" in err
    (wf / "url.yaml").write_text(yaml.safe_dump({"models": {TINY: {"model_url": "https://huggingface.co/me/tiny-neox-ja-{quant}-MLC"}}}))
    out = run_snakemake(wf, "-n", "-p", "--configfile", "config/tiny.yaml", "url.yaml", "--config", "bundle_weight=False").stdout
    assert "--model-url https://huggingface.co/me/tiny-neox-ja-q4f16_0-MLC" in out
    assert "--model-url" not in run_snakemake(wf, "-n", "-p", "--configfile", "config/tiny.yaml", "url.yaml").stdout


def test_package_config_chooses_the_app_bundles(wf):
    (wf / "pkg.json").write_text(json.dumps({"device": "iphone", "model_list": [
        {"model": "HF://me/x", "model_id": f"{TINY}-q4f16_1", "estimated_vram_bytes": 10**9, "overrides": {"context_window_size": 256}}]}))
    out = run_snakemake(wf, "-n", "-p", "dist/app", "--configfile", "config/tiny.yaml", "--config", "package_config=pkg.json").stdout
    assert planned_jobs(out)["package"] == 1 and "--bundle dist/tiny-neox-ja-q4f16_1 --package-config pkg.json" in out
    err = _fails(wf, "dist/app", "--configfile", "config/tiny.yaml", "--config", "package_config=pkg.json", "max_seq_len=128")
    assert f"override context_window_size=256 for model_id '{TINY}-q4f16_1' differs from the compiled 128" in err
    (wf / "pkg.json").write_text(json.dumps({"device": "iphone", "model_list": [{"model": "HF://me/x", "model_id": "gpt2-q4f16_1", "estimated_vram_bytes": 1}]}))
    err = _fails(wf, "dist/app", "--configfile", "config/tiny.yaml", "--config", "package_config=pkg.json")
    assert "model_id 'gpt2-q4f16_1' in the package config names no bundle; allowed:" in err


# --- bad input: each stops before any job runs, with one line naming the value and what is allowed


def _fails(wf, *args):
    proc = run_snakemake(wf, "-n", *args, check=False)
    assert proc.returncode != 0
    assert "Job stats" not in proc.stdout
    return proc.stdout + proc.stderr


def test_unknown_quantization_in_config(wf):
    err = _fails(wf, "--config", "quantizations=[q5f16]")
    assert "unknown quantization 'q5f16' in config; allowed: q0f32, q0f16, q4f16_0, q4f16_1, q4f32_1, q3f16_1" in err


def test_unknown_model_or_quantization_in_target(wf):
    err = _fails(wf, "dist/no-such-model-q4f16_0")
    assert "unknown bundle dist/no-such-model-q4f16_0; allowed:" in err and f"{REAL}-q4f16_0" in err
    err = _fails(wf, f"dist/{REAL}-q9f16")
    assert f"unknown bundle dist/{REAL}-q9f16" in err


@pytest.mark.parametrize("value,expected", [
    ("0", "max_seq_len"),
    ("5000", "model 'tiny-neox-ja': context window (max_seq_len) 5000 is out of range; allowed: 1..1024 (the model's max_position_embeddings)"),
])
def test_max_seq_len_out_of_range(wf, value, expected):
    err = _fails(wf, "--configfile", "config/tiny.yaml", "--config", f"max_seq_len={value}")
    assert expected in err
    if value == "0":
        assert "0 is less than the minimum of 1" in err


def test_template_missing_a_field(wf):
    (wf / "bad.yaml").write_text(yaml.safe_dump({"conv_templates": {"broken": {"system_message": "", "roles": {"user": "u", "assistant": "a"}}},
                                                 "models": {REAL: {"conv_template": "broken"}}}))
    err = _fails(wf, "--configfile", "bad.yaml")
    assert "'role_content_sep' is a required property" in err


def test_local_path_without_config_json(wf, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (wf / "local.yaml").write_text(yaml.safe_dump({"build_models": ["local"], "models": {"local": {"local_path": str(empty), "revision": "v1", "conv_template": "line_llm"}}}))
    err = _fails(wf, "--configfile", "local.yaml")
    assert f"model 'local': local_path {empty} has no config.json" in err


def test_local_path_without_tokenizer_fails_at_first_job(wf, tmp_path, fixtures_dir):
    model = tmp_path / "no-tok"
    shutil.copytree(fixtures_dir / "model", model)
    (model / "tokenizer.json").unlink()
    (wf / "local.yaml").write_text(yaml.safe_dump({"build_models": ["local"], "models": {"local": {"local_path": str(model), "revision": "v1", "conv_template": "line_llm"}}, "max_seq_len": 256}))
    proc = run_snakemake(wf, "--configfile", "local.yaml", check=False)
    assert proc.returncode != 0
    log = (wf / "logs" / "local" / "fetch_model.log").read_text()
    assert log.strip().splitlines()[-1] == f"error: model directory {model} has no tokenizer (one of tokenizer.json, tokenizer.model, spiece.model, vocab.json, sentencepiece.bpe.model)"
    assert not (wf / "resources" / "models" / "local").exists() or not any((wf / "resources" / "models" / "local").iterdir())


def test_lint_is_clean(wf):
    proc = run_snakemake(wf, "--lint", check=False)
    assert proc.returncode == 0 and "Congratulations" in proc.stdout + proc.stderr


def test_compiler_change_reruns_libraries_and_bundles_only(tiny_build):
    compiler = tiny_build / "neox_mlc" / "cpu_schedule.py"
    original = compiler.read_text()
    try:
        compiler.write_text(original + "\n# a change to the compiler\n")
        out = run_snakemake(tiny_build, "-n", "--configfile", "config/tiny.yaml").stdout
        # app_config reads estimated_vram_bytes from the iphone library, so it follows the compiler
        assert planned_jobs(out) == {"compile": 4, "app_config": 2, "package": 2, "app": 1, "all": 1}
    finally:
        compiler.write_text(original)


def test_new_weights_rerun_conversion_not_just_the_plan(tiny_build):
    # Same shapes (so an identical plan), different values: every shard must be reconverted.
    (tiny_build / "reseed.yaml").write_text(yaml.safe_dump({"models": {TINY: {"generate": {"seed": 1}}}}))
    out = run_snakemake(tiny_build, "-n", "--configfile", "config/tiny.yaml", "reseed.yaml").stdout
    jobs = planned_jobs(out)
    assert jobs.get("generate_tiny_model") == 1 and jobs.get("fetch_model") == 1
    assert jobs.get("weight_plan") == 2 and jobs.get("convert_shard") == 2  # shards depend on the weights, not just the plan


def test_mlc_llm_backend_without_the_cli_names_the_missing_tool(wf):
    proc = run_snakemake(wf, f"build/{TINY}/q4f16_1/weight-plan.json", "--configfile", "config/tiny.yaml", "--config", "backend=mlc_llm", check=False)
    assert proc.returncode != 0
    log = (wf / "logs" / TINY / "q4f16_1" / "weight_plan.log").read_text().strip().splitlines()[-1]
    assert log == "error: backend mlc_llm selected but the mlc_llm CLI is not installed (install MLC-LLM or use backend: native)"
    assert not (wf / "build" / TINY / "q4f16_1" / "weight-plan.json").exists()


def test_mlc_llm_backend_runs_the_real_cli_argv(wf, tmp_path):
    """A recording stand-in for the `mlc_llm` executable checks the workflow's calls and wiring.

    The stand-in records its argv and delegates convert_weight and compile to this project's
    converter and compiler (same flags) so the rest of the graph — app configs, libmodel_iphone.a —
    has real files to pass on; it is test scaffolding for the argv contract only.
    """
    import sys

    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "calls.jsonl"
    stub = bindir / "mlc_llm"
    stub.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if sys.argv[1] == 'convert_weight':\n"
        f"    sys.path.insert(0, {str(wf)!r})\n"
        "    from neox_mlc.convert_weight import convert\n"
        "    a = sys.argv\n"
        "    convert(a[2], a[a.index('--quantization') + 1], a[a.index('-o') + 1])\n"
        "else:\n"
        f"    sys.path.insert(0, {str(wf)!r})\n"
        "    from neox_mlc.compile import build\n"
        "    a = sys.argv\n"
        "    prefix = a[a.index('--system-lib-prefix') + 1] if '--system-lib-prefix' in a else None\n"
        "    build(a[2], a[a.index('--device') + 1], a[a.index('-o') + 1], prefix)\n"
    )
    stub.chmod(0o755)
    run_snakemake(wf, "--configfile", "config/tiny.yaml", "--config", "backend=mlc_llm", "quantizations=[q4f16_1]",
                  env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    convert_calls = [c for c in calls if c[0] == "convert_weight"]
    assert len(convert_calls) == 1
    assert convert_calls[0][:6] == ["convert_weight", f"resources/models/{TINY}", "--quantization", "q4f16_1", "--device", "cpu"]
    compile_calls = sorted(c for c in calls if c[0] == "compile")
    assert [c[3] for c in compile_calls] == ["cpu", "iphone"]  # --device, for llvm and iphone
    assert all(c[1] == f"build/{TINY}/q4f16_1/mlc-chat-config.json" for c in compile_calls)
    manifest = json.loads((wf / "dist" / f"{TINY}-q4f16_1" / "MANIFEST.json").read_text())
    assert f"bundle/{TINY}-q4f16_1/params_shard_0.bin" in manifest["files"]


def test_rules_pass_their_threads_to_the_steps(tiny_build):
    """A job's ``threads`` (scaled down to the cores given) reach the step: the converter and the trainer
    size their pools from it rather than from the machine (a cluster job must stay inside its allotment)."""
    out = run_snakemake(tiny_build, "-n", "-p", "-c1", "--forceall", "--configfile", "config/tiny.yaml").stdout
    cmds = [line[line.index("python scripts/") :] for line in out.splitlines() if "python scripts/" in line]
    shard_cmds = [c for c in cmds if c.startswith("python scripts/convert_weight.py") and "--shard" in c]
    gen_cmds = [c for c in cmds if c.startswith("python scripts/make_tiny_model.py")]
    assert shard_cmds and all("--threads 1 " in c for c in shard_cmds)
    assert gen_cmds and all("--threads 1 " in c for c in gen_cmds)


def test_converter_refuses_zero_threads(tiny_build):
    proc = subprocess.run(
        [sys.executable, "scripts/convert_weight.py", f"resources/models/{TINY}", "--quantization", "q0f16", "--threads", "0", "-o", "o"],
        cwd=tiny_build, capture_output=True, text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == "error: threads 0 is out of range; allowed: 1 or more"
    assert not (tiny_build / "o").exists()


def _rule_graph(wf) -> dict[str, set[str]]:
    """rule -> rules that consume its outputs, from Snakemake's own ``--rulegraph``."""
    dot = run_snakemake(wf, "--rulegraph", "--configfile", "config/tiny.yaml").stdout
    labels = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)"', dot, re.M))
    graph: dict[str, set[str]] = {name: set() for name in labels.values()}
    for src, dst in re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M):
        graph[labels[src]].add(labels[dst])
    return graph


def _downstream(graph: dict[str, set[str]], start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        rule = todo.pop()
        if rule in graph and rule not in seen:
            seen.add(rule)
            todo += graph[rule]
    return seen


def test_editing_each_library_module_reruns_exactly_its_dependants(tiny_build):
    """Expected: the rules whose entry script imports the module (Python's own modulefinder, not the
    workflow's derivation), and everything downstream of them in Snakemake's rule graph. Modules no
    rule of the default target imports are edited together (one plan): reruns only grow with edits,
    so an empty plan for all of them is an empty plan for each."""
    from conftest import rule_entry_scripts
    from test_codedeps import _oracle

    graph = _rule_graph(tiny_build)
    entries = rule_entry_scripts()
    imports = {rule: _oracle(entry) for rule, entry in entries.items() if rule in graph}
    modules = sorted(p.name for p in (tiny_build / "neox_mlc").glob("*.py"))
    expected = {m: _downstream(graph, {r for r, mods in imports.items() if f"neox_mlc/{m}" in mods}) for m in modules}
    unused = [m for m in modules if not expected[m]]
    groups = [[m] for m in modules if expected[m]] + [unused]
    for group in groups:
        paths = [tiny_build / "neox_mlc" / m for m in group]
        originals = [p.read_text() for p in paths]
        try:
            for p, text in zip(paths, originals, strict=True):
                p.write_text(text + "\n# an edit\n")
            planned = set(planned_jobs(run_snakemake(tiny_build, "-n", "--configfile", "config/tiny.yaml").stdout))
        finally:
            for p, text in zip(paths, originals, strict=True):
                p.write_text(text)
                os.utime(p, (1, 1))  # older than every output again: the next plan starts clean
        assert planned == set().union(*(expected[m] for m in group)), group
    assert len(groups) - 1 >= 8 and len(unused) >= 5  # most modules feed the bundle; the user tools do not


def test_llama_cpp_rows_are_planned_only_when_configured_and_installed(wf, tmp_path):
    """llama.cpp's own rows (#15) need the optional llama-cpp-python: none by default, none (with a warning) without it."""
    fake = tmp_path / "fake-python"  # stands in for the llama.cpp interpreter at planning time only (nothing runs)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    assert "evaluate_llama_cpp" not in planned_jobs(run_snakemake(wf, "-n", "reports", env={"LLAMA_PYTHON": str(fake)}).stdout)
    asked = ("--config", "llama_cpp_types=[Q4_0,Q8_0]")
    assert planned_jobs(run_snakemake(wf, "-n", "reports", *asked, env={"LLAMA_PYTHON": str(fake)}).stdout)["evaluate_llama_cpp"] == 2
    missing = run_snakemake(wf, "-n", "reports", *asked, env={"LLAMA_PYTHON": str(tmp_path / "nope")})
    assert "evaluate_llama_cpp" not in planned_jobs(missing.stdout)
    assert f"warning: no llama-cpp-python in {tmp_path / 'nope'} (LLAMA_PYTHON): the reports leave out llama.cpp Q4_0, Q8_0" in missing.stderr
