"""Issue #12's probes, each through the real CLI: never lose a user's files, never convert a malformed
checkpoint, never run a corrupted bundle. SECURITY.md lists every probe with the test that holds it.

Each refusal is one ``error:`` line naming the bad value, exit code 2, no traceback, and the user's
files untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import REPO, copy_workflow, run_snakemake

QUANT = "q4f16_0"
REAL = "japanese-large-lm-3.6b-instruction-sft"


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``neox-mlc ARGS`` in a fresh interpreter (this checkout's package first on the path)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "neox_mlc.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout, check=False)


def refused(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The process stopped with exactly one ``error:`` line holding every fragment, and no traceback."""
    assert proc.returncode == 2, f"rc {proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def model(tmp_path, fixtures_dir) -> Path:
    out = tmp_path / "model"
    shutil.copytree(fixtures_dir / "model", out)
    return out


def user_folder(path: Path) -> dict[str, bytes]:
    """A folder of the user's with a file in it; returns its content to compare afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.txt").write_text("three years of work\n")
    return snapshot(path)


# --- 1. only ever delete what the step itself made


def test_convert_refuses_a_users_folder_and_keeps_its_files(model, tmp_path):
    before = user_folder(tmp_path / "mine")
    refused(cli("convert_weight", str(model), "--quantization", QUANT, "-o", str(tmp_path / "mine")), "not empty", "mine")
    assert snapshot(tmp_path / "mine") == before


@pytest.mark.parametrize("output,what", [(".", "contains the input"), ("model", "is the input"), ("model/params", "lies inside the input")])
def test_convert_refuses_an_output_around_the_model(model, tmp_path, output, what):
    before = snapshot(tmp_path)
    refused(cli("convert_weight", "model", "--quantization", QUANT, "-o", output, cwd=tmp_path), what)
    assert snapshot(tmp_path) == before


def test_convert_takes_an_empty_folder_and_replaces_only_its_own_output(model, tmp_path):
    out = tmp_path / "params"
    out.mkdir()
    assert cli("convert_weight", str(model), "--quantization", QUANT, "-o", str(out)).returncode == 0
    assert cli("convert_weight", str(model), "--quantization", QUANT, "-o", str(out)).returncode == 0  # its own: replaced
    (out / "notes.txt").write_text("mine")
    refused(cli("convert_weight", str(model), "--quantization", QUANT, "-o", str(out)), "notes.txt", "did not write")
    assert (out / "notes.txt").read_text() == "mine" and (out / "tensor-cache.json").is_file()


def test_tokenizer_refuses_a_users_folder(model, tmp_path):
    before = user_folder(tmp_path / "mine")
    refused(cli("tokenizer", str(model), "-o", str(tmp_path / "mine")), "not empty")
    assert snapshot(tmp_path / "mine") == before


def test_fetch_refuses_a_users_folder(model, tmp_path):
    before = user_folder(tmp_path / "mine")
    refused(cli("fetch", "--local-path", str(model), "--revision", "v1", "-o", str(tmp_path / "mine")), "not empty")
    assert snapshot(tmp_path / "mine") == before


def test_fetch_refuses_the_local_checkpoint_as_output(model):
    before = snapshot(model)
    refused(cli("fetch", "--local-path", str(model), "--revision", "v1", "-o", str(model)), "is the input")
    assert snapshot(model) == before


def test_generate_refuses_a_users_folder(tmp_path):
    before = user_folder(tmp_path / "mine")
    corpus = str(REPO / "data" / "corpus_ja.txt")
    proc = cli("generate", "-o", str(tmp_path / "mine"), "--corpus", corpus, "--vocab-size", "300", "--num-layers", "1")
    refused(proc, "not empty")
    assert snapshot(tmp_path / "mine") == before


def test_summarize_refuses_to_write_over_its_input(tmp_path):
    report = tmp_path / "quality.json"
    report.write_text(json.dumps({"method": "mlc", "quantization": QUANT, "bits_per_param": 4.5, "kl_mean": 0.01, "delta_ppl": 0.1}))
    before = report.read_bytes()
    refused(cli("summarize", str(report), "--csv", str(report), "--png", str(tmp_path / "q.png")), "is the input")
    assert report.read_bytes() == before


# --- a bundle made through the real CLI (library compiled once for this module)


@pytest.fixture(scope="module")
def made(tmp_path_factory, fixtures_dir, compiled) -> dict[str, Path]:
    """fetch -> tokenizer -> convert_weight -> gen_config -> package app-config / bundle, all via ``neox-mlc``."""
    root = tmp_path_factory.mktemp("made")
    paths = {name: root / name for name in ("snap", "tok", "params", "dist")}

    def ok(*args: str) -> None:
        proc = cli(*args, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]

    ok("fetch", "--local-path", str(fixtures_dir / "model"), "--revision", "v1", "-o", "snap")
    ok("tokenizer", "snap", "-o", "tok")
    ok("convert_weight", "snap", "--quantization", QUANT, "-o", "params")
    ok("gen_config", "snap", "--quantization", QUANT, "--conv-template", "line_llm", "--context-window-size", "128",
       "--tokenizer-dir", "tok", "--skip-tokenizer-copy", "-o", "params")
    lib = root / "lib" / "m-llvm.so"
    lib.parent.mkdir()
    shutil.copy2(compiled(paths["params"] / "mlc-chat-config.json", "llvm"), lib)
    ok("package", "app-config", "--model-id", "m", "--model-lib", "m", "--lib", str(lib), "--chat-config",
       "params/mlc-chat-config.json", "--seed-out", "app-config.json", "--mlc-out", "mlc-app-config.json")
    paths["bundle_args"] = root / "bundle_args.json"
    args = ["package", "bundle", "--model-id", "m", "--params", "params", "--chat-config", "params/mlc-chat-config.json",
            "--tokenizer", "tok", "--lib", str(lib), "--app-config", "app-config.json", "--mlc-app-config", "mlc-app-config.json",
            "--snapshot", "snap/snapshot.json", "--model", "m", "--target", "llvm"]
    paths["bundle_args"].write_text(json.dumps(args))
    ok(*args, "-o", "dist")
    paths["root"] = root
    return paths


def package_bundle(made: dict[str, Path], output: Path) -> subprocess.CompletedProcess:
    return cli(*json.loads(made["bundle_args"].read_text()), "-o", str(output), cwd=made["root"])


def test_package_refuses_a_users_folder_and_replaces_its_own_bundle(made, tmp_path):
    before = user_folder(tmp_path / "mine")
    refused(package_bundle(made, tmp_path / "mine"), "not empty")
    assert snapshot(tmp_path / "mine") == before
    assert package_bundle(made, made["root"] / "dist").returncode == 0


@pytest.fixture()
def flipped(made, tmp_path) -> Path:
    """A copy of the bundle with one byte of its params shard flipped."""
    bundle = tmp_path / "dist"
    shutil.copytree(made["dist"], bundle)
    shard = bundle / "bundle" / "m" / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    return bundle


# --- 5. a bundle is verified before it runs


def test_verify_accepts_the_bundle_as_made(made):
    proc = cli("verify", str(made["dist"]))
    assert proc.returncode == 0 and "match MANIFEST.json" in proc.stdout, proc.stderr


def test_verify_names_a_flipped_byte_in_a_bundle(flipped):
    refused(cli("verify", str(flipped)), "params_shard_0.bin is corrupt", "sha256")


def test_verify_names_a_flipped_byte_in_a_params_folder(flipped):
    refused(cli("verify", str(flipped / "bundle" / "m")), "params_shard_0.bin is corrupt", "md5")


def test_verify_names_a_missing_or_an_unlisted_file(made, tmp_path):
    bundle = tmp_path / "dist"
    shutil.copytree(made["dist"], bundle)
    (bundle / "bundle" / "m" / "extra.bin").write_bytes(b"x")
    refused(cli("verify", str(bundle)), "extra.bin is not in MANIFEST.json")
    (bundle / "bundle" / "m" / "extra.bin").unlink()
    (bundle / "bundle" / "m" / "tokenizer.json").unlink()
    refused(cli("verify", str(bundle)), "tokenizer.json listed in MANIFEST.json is missing")


def test_verify_bundle_entry_script(flipped):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "verify_bundle.py"), str(flipped)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    refused(proc, "is corrupt")


def test_chat_refuses_a_corrupted_bundle(flipped):
    refused(cli("chat", str(flipped), "--prompt", "日本の首都は?", "--max-tokens", "4"), "params_shard_0.bin is corrupt")


def test_runtime_checks_md5_before_loading(made, flipped):
    from neox_mlc.common import WorkflowError
    from neox_mlc.runtime import ModelRuntime

    with pytest.raises(WorkflowError, match=r"params_shard_0\.bin is corrupt: md5"):
        ModelRuntime(made["dist"] / "lib" / "m-llvm.so", flipped / "bundle" / "m")


# --- 8. chat arguments


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--prompt", "こんにちは", "--max-tokens", "-1"], "--max-tokens -1"),
        (["--prompt", "こんにちは", "--max-tokens", "0"], "--max-tokens 0"),
        (["--prompt", "", "--max-tokens", "4"], "--prompt is empty"),
        (["--prompt", "こんにちは", "--temperature", "nan"], "--temperature nan"),
        (["--prompt", "こんにちは", "--temperature", "-0.5"], "--temperature -0.5"),
    ],
)
def test_chat_refuses_bad_generation_arguments(made, args, fragment):
    refused(cli("chat", str(made["dist"]), *args), fragment)


# --- 2. safetensors headers are validated before a byte is read


def rewrite_header(path: Path, mutate: Callable[[dict[str, Any]], Any]) -> None:
    """Rewrite a safetensors file's header in place, keeping its data section."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = mutate(json.loads(raw[8 : 8 + n]))
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def _set(name: str, **fields: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def mutate(h: dict[str, Any]) -> dict[str, Any]:
        h[name] = {**h[name], **fields}
        return h

    return mutate


def _drop(name: str, key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def mutate(h: dict[str, Any]) -> dict[str, Any]:
        del h[name][key]
        return h

    return mutate


def _overlap(h: dict[str, Any]) -> dict[str, Any]:
    h["gpt_neox.final_layer_norm.weight"]["data_offsets"] = list(h["gpt_neox.final_layer_norm.bias"]["data_offsets"])
    return h


def _reversed(h: dict[str, Any]) -> dict[str, Any]:
    h["gpt_neox.final_layer_norm.bias"]["data_offsets"] = h["gpt_neox.final_layer_norm.bias"]["data_offsets"][::-1]
    return h


LN_B = "gpt_neox.final_layer_norm.bias"
HOSTILE_HEADERS = {
    "overlapping offsets": (_overlap, "overlaps tensor"),
    "shape larger than its bytes": (_set(LN_B, shape=[128]), "needs 256 bytes"),
    "shape smaller than its bytes": (_set(LN_B, shape=[32]), "needs 64 bytes"),
    "F16 bytes labelled F32": (_set(LN_B, dtype="F32"), "of F32 needs 256 bytes"),
    "entry without dtype": (_drop(LN_B, "dtype"), "lacks dtype"),
    "header that is a JSON list": (lambda h: list(h.items()), "not an object"),
    "reversed offsets": (_reversed, "are reversed"),
}


@pytest.mark.parametrize("probe", list(HOSTILE_HEADERS))
def test_malformed_safetensors_header_is_refused(model, tmp_path, probe):
    mutate, fragment = HOSTILE_HEADERS[probe]
    rewrite_header(model / "model.safetensors", mutate)
    line = refused(cli("convert_weight", str(model), "--quantization", QUANT, "-o", str(tmp_path / "out")), fragment)
    assert "model.safetensors" in line
    if probe != "header that is a JSON list":
        assert "tensor gpt_neox.final_layer_norm" in line
    assert not (tmp_path / "out").exists()


def test_a_tensor_defined_in_two_files_is_refused(model, tmp_path):
    from safetensors.numpy import save_file

    save_file({LN_B: np.full(64, 7, dtype=np.float16)}, str(model / "model2.safetensors"))
    refused(cli("convert_weight", str(model), "--quantization", QUANT, "-o", str(tmp_path / "out")),
            "model2.safetensors", f"tensor {LN_B} is already defined in")
    assert not (tmp_path / "out").exists()


# --- 3. config and tensors agree before any output


def edit_config(model: Path, **fields: Any) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(fields)
    (model / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "fields,fragments",
    [
        ({"hidden_size": 128}, ["has shape [1024, 64]", "config.json implies [1024, 128]"]),
        ({"vocab_size": 1_000_000_000}, ["has shape [1024, 64]", "config.json implies [1000000000, 64]"]),
        ({"num_hidden_layers": -3}, ["num_hidden_layers is -3", "integer >= 1"]),
        ({"num_hidden_layers": 1}, ["gpt_neox.layers.1.", "num_hidden_layers is 1"]),
        ({"num_attention_heads": 0}, ["num_attention_heads is 0", "integer >= 1"]),
        ({"num_attention_heads": 5}, ["not divisible by num_attention_heads 5"]),
        ({"intermediate_size": "256"}, ["intermediate_size is '256'"]),
    ],
)
def test_config_that_disagrees_with_its_tensors_is_refused(model, tmp_path, fields, fragments):
    edit_config(model, **fields)
    refused(cli("convert_weight", str(model), "--quantization", QUANT, "-o", str(tmp_path / "out")), *fragments)
    assert not (tmp_path / "out").exists()


# --- 4. non-finite weights


def _poison(model: Path, name: str, values: list[float]) -> None:
    raw = bytearray((model / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start = 8 + n + json.loads(raw[8 : 8 + n])[name]["data_offsets"][0]
    bad = np.array(values, dtype=np.float16).tobytes()
    raw[start : start + len(bad)] = bad
    (model / "model.safetensors").write_bytes(bytes(raw))


def test_non_finite_weights_stop_the_conversion_unless_allowed(model, tmp_path):
    name = "gpt_neox.layers.0.attention.dense.weight"
    _poison(model, name, [np.nan, np.inf, -np.inf])
    refused(cli("convert_weight", str(model), "--quantization", QUANT, "-o", str(tmp_path / "out")),
            f"tensor {name} has 3 non-finite", "--allow-non-finite")
    assert not (tmp_path / "out").exists()
    proc = cli("convert_weight", str(model), "--quantization", QUANT, "-o", str(tmp_path / "out"), "--allow-non-finite")
    assert proc.returncode == 0, proc.stderr


# --- 6. network: a hub that accepts and never answers


@pytest.fixture()
def silent_endpoint():
    """A loopback socket that accepts connections (the kernel's backlog) and never replies."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_silent_hub_fails_promptly_with_one_line(silent_endpoint, tmp_path):
    from neox_mlc.hub import HUB_ATTEMPTS

    env = {"HF_ENDPOINT": silent_endpoint, "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_OFFLINE": "0"}
    start = time.monotonic()
    proc = cli("fetch", "--hf-repo", "line-corporation/x", "-o", str(tmp_path / "m"), env=env, timeout=120)
    elapsed = time.monotonic() - start
    refused(proc, silent_endpoint, "did not answer", f"in {HUB_ATTEMPTS} attempts with a 2 s timeout")
    # attempts × timeout + backoff (1 + 2 s) + start-up; with the default 10 s timeout the same is ~35 s
    assert elapsed < HUB_ATTEMPTS * 2 + 3 + 15, elapsed
    assert not (tmp_path / "m").exists()


# --- 7. one line on the console for every failure


def test_failed_job_shows_its_cause_and_no_traceback(tmp_path):
    wf = copy_workflow(tmp_path)
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(wf)}  # port 9: nothing listens
    proc = run_snakemake(wf, f"resources/models/{REAL}/snapshot.json", check=False, env=env)
    assert proc.returncode != 0
    console = proc.stdout + proc.stderr
    assert "Traceback" not in console, console[-3000:]
    # the first hub contact is the config-only fetch (model_config), before any weights
    cause = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: rule model_config")]
    assert len(cause) == 1 and "could not be reached" in cause[0] and "model_config.log" in cause[0], console[-3000:]


def _workflow_with_local_model(wf: Path, model: Path) -> None:
    cfg = {"build_models": ["local"], "models": {"local": {"local_path": str(model), "revision": "v1", "conv_template": "line_llm"}}}
    (wf / "local.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize(
    "content,fragment",
    [("{not json", "is not valid JSON"), ("[1, 2]", "is a JSON list"), (None, "max_position_embeddings is 'many'")],
)
def test_malformed_local_config_json_is_named_at_planning(model, tmp_path, content, fragment):
    if content is None:
        edit_config(model, max_position_embeddings="many")
    else:
        (model / "config.json").write_text(content)
    wf = copy_workflow(mkdir(tmp_path / "wf"))
    _workflow_with_local_model(wf, model)
    proc = run_snakemake(wf, "-n", "--configfile", "local.yaml", check=False)
    refused(proc, str(model / "config.json"), fragment)
    assert not (wf / "resources").exists()


def test_vulkan_target_is_refused_at_planning(tmp_path):
    wf = copy_workflow(mkdir(tmp_path / "wf"))
    proc = run_snakemake(wf, "-n", "--configfile", "config/tiny.yaml", "--config", "target=vulkan", check=False)
    refused(proc, "target 'vulkan' cannot be built here", "SPIR-V", "allowed:")
