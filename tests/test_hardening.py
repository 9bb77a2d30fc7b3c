"""Hostile input never costs a user their data: names, config, disk, locks, kills, pickles."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neox_mlc.common import WorkflowError

from conftest import REPO, copy_workflow, run_snakemake

TINY = "tiny-neox-ja"


def _merged_tiny_config() -> dict:
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    tiny = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    base["models"].update(tiny.pop("models"))
    base.update(tiny)
    return base


def _refused(wf: Path, *args: str) -> str:
    proc = run_snakemake(wf, "-n", *args, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr and "Job stats" not in proc.stdout
    assert not (wf / "resources").exists() and not (wf / "build").exists()
    return errors[0]


HOSTILE_MODEL_NAMES = ["../evil", "a/b", "x;rm -rf ~", "$(touch pwned)", "`touch pwned`", "has space", ".hidden"]
HOSTILE_REVISIONS = ["../../etc/passwd", "main;touch pwned", "$(touch pwned)", "a/../../b"]
HOSTILE_CONFIG = [
    ("quantizations=[q4f16_1;touch pwned]", "quantizations/0"),
    ("quantizations=[../q4f16_1]", "quantizations/0"),
    ("target=llvm&&touch pwned", "target"),
    ("target=../iphone", "target"),
    ("max_seq_len=-5", "max_seq_len"),
]


@pytest.fixture()
def wf(tmp_path):
    return copy_workflow(tmp_path)


@pytest.mark.parametrize("name", HOSTILE_MODEL_NAMES)
def test_hostile_model_names_are_refused(wf, name):
    cfg = {"build_models": [name], "models": {name: {"hf_repo": "line-corporation/x", "revision": "main", "conv_template": "line_llm"}}}
    (wf / "hostile.yaml").write_text(yaml.safe_dump(cfg))
    line = _refused(wf, "--configfile", "hostile.yaml")
    assert "invalid config at" in line
    assert not (wf / "pwned").exists()


@pytest.mark.parametrize("revision", HOSTILE_REVISIONS)
def test_hostile_revisions_are_refused(wf, revision):
    cfg = {"models": {"japanese-large-lm-3.6b-instruction-sft": {"revision": revision}}}
    (wf / "hostile.yaml").write_text(yaml.safe_dump(cfg))
    line = _refused(wf, "--configfile", "hostile.yaml")
    assert "models/japanese-large-lm-3.6b-instruction-sft/revision" in line


@pytest.mark.parametrize("repo", ["a/../b", "../x/y", "a/b;touch pwned", "a/b c"])
def test_hostile_repos_are_refused(wf, repo):
    (wf / "hostile.yaml").write_text(yaml.safe_dump({"models": {"japanese-large-lm-3.6b-instruction-sft": {"hf_repo": repo}}}))
    assert "hf_repo" in _refused(wf, "--configfile", "hostile.yaml")


@pytest.mark.parametrize("path", ["/tmp/x;touch pwned", "$(touch pwned)", "a b"])
def test_hostile_local_paths_are_refused(wf, path):
    cfg = {"build_models": ["m"], "models": {"m": {"local_path": path, "revision": "v1", "conv_template": "line_llm"}}}
    (wf / "hostile.yaml").write_text(yaml.safe_dump(cfg))
    assert "local_path" in _refused(wf, "--configfile", "hostile.yaml")
    assert not (wf / "pwned").exists()


@pytest.mark.parametrize("override,where", HOSTILE_CONFIG)
def test_hostile_command_line_values_are_refused(wf, override, where):
    assert f"invalid config at {where}" in _refused(wf, "--config", override)
    assert not (wf / "pwned").exists()


# --- config fuzzing: every malformed config ends in one WorkflowError line, never another exception

VALID = _merged_tiny_config()
PATHS = [
    ("max_seq_len",), ("quantizations",), ("target",), ("build_models",), ("extra_targets",), ("backend",),
    ("models", TINY, "generate", "hidden_size"), ("models", TINY, "revision"), ("models", TINY, "conv_template"),
    ("conv_templates", "line_llm", "seps"), ("conv_templates", "line_llm", "stop_token_ids"), ("conv_templates", "line_llm", "roles"),
    ("evaluation", "max_tokens"), ("bundle_weight",), ("package_config",),
]
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False), st.text(max_size=12),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _apply(cfg: dict, path: tuple, action: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    node = cfg
    for key in path[:-1]:
        node = node[key]
    if action == "delete":
        node.pop(path[-1], None)
    elif action == "unknown":
        node["no_such_key"] = value if not isinstance(node, list) else value
    else:
        node[path[-1]] = value
    return cfg


def _check(cfg: dict) -> None:
    from neox_mlc.workflow_config import check_config, plan_app, validate_config

    validate_config(cfg, REPO / "config" / "config.schema.yaml")
    check_config(cfg, REPO)
    plan_app(cfg)  # the app's bundles (bundle_weight, package_config), checked by rules/common.smk too


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), action=st.sampled_from(["replace", "delete", "unknown"]), value=JUNK)
def test_fuzzed_configs_fail_with_one_line_or_pass(path, action, value):
    cfg = _apply(VALID, path, action, value)
    try:
        _check(cfg)
    except WorkflowError as err:
        assert "\n" not in str(err) and str(err)
    # a mutation may happen to be valid (e.g. deleting an optional key): then every job must be able to use it
    else:
        _assert_usable(cfg)


def _assert_usable(cfg: dict) -> None:
    """What the jobs rely on once planning has accepted a config (else they would fail mid-run)."""
    import json

    from neox_mlc.gen_config import conv_template
    from neox_mlc.layout import TARGETS
    from neox_mlc.neox_config import check_context_window
    from neox_mlc.quantization import QUANTIZATIONS

    assert set(cfg["build_models"]) <= set(cfg["models"])
    assert cfg["quantizations"] and all(q in QUANTIZATIONS for q in cfg["quantizations"])
    assert all(t in TARGETS for t in [cfg["target"], *cfg.get("extra_targets", [])])
    for spec in cfg["models"].values():
        name = spec["conv_template"]
        expanded = conv_template(name, cfg["conv_templates"][name], 0)
        assert all(isinstance(s, str) for s in expanded["seps"] + expanded["stop_str"])
        assert all(isinstance(i, int) and not isinstance(i, bool) for i in expanded["stop_token_ids"])
        json.dumps(expanded)
        if "generate" in spec:
            g = spec["generate"]
            assert g["hidden_size"] % g["num_heads"] == 0, "the generated model would be refused by gen_config"
            check_context_window(cfg["max_seq_len"], g["max_position_embeddings"])


def test_generated_model_heads_must_divide_hidden():
    # found by the fuzzing above once it checked what a passing config must give the jobs
    cfg = _apply(VALID, ("models", TINY, "generate", "hidden_size"), "replace", 10)
    with pytest.raises(WorkflowError, match=r"^model 'tiny-neox-ja': generate\.hidden_size 10 is not divisible by num_heads 4; allowed: a multiple of num_heads$"):
        _check(cfg)


def test_fuzzing_reaches_the_cli_as_one_line(wf):
    for override in ("max_seq_len=abc", "quantizations=7", "extra_targets=[vulkan2]"):
        _refused(wf, "--configfile", "config/tiny.yaml", "--config", override)


# --- disk, locks, kills


def test_conversion_stops_before_writing_when_the_disk_is_too_small(fixtures_dir, tmp_path, monkeypatch):
    import shutil as _shutil

    from neox_mlc.convert_weight import convert

    monkeypatch.setattr(_shutil, "disk_usage", lambda p: _shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(WorkflowError, match=r"not enough disk space for q0f16 params in .*: need 0\.\d\d GB, 0\.00 GB free"):
        convert(fixtures_dir / "model", "q0f16", tmp_path / "params")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_mid_write_leaves_nothing_a_rerun_trusts(tmp_path, monkeypatch):
    import errno

    import numpy as np

    import neox_mlc.tensor_cache as tc

    real_open = open

    class FullDisk:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tc, "open", FullDisk, raising=False)
    chunk = tc.encode(np.arange(100, dtype=np.uint32))
    with pytest.raises(OSError, match="No space left"):
        tc.write_shard(tmp_path / "params_shard_0.bin", [chunk], 400)
    assert list(tmp_path.iterdir()) == []


def _start(wf: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(wf / "Snakefile"), "-d", str(wf), "-c2", "--configfile", "config/tiny.yaml"]
    return subprocess.Popen(cmd, cwd=wf, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _manifest_shas(wf: Path) -> dict:
    out = {}
    for q in ("q0f16", "q4f16_0"):
        m = json.loads((wf / "dist" / f"{TINY}-{q}" / "MANIFEST.json").read_text())
        out[q] = {k: v["sha256"] for k, v in m["files"].items()}
    return out


@pytest.fixture(scope="module")
def reference_build(tmp_path_factory):
    """An uninterrupted tiny build; while it runs, a second run on the same directory is refused."""
    wf = copy_workflow(tmp_path_factory.mktemp("reference"))
    first = _start(wf)
    deadline = time.time() + 60
    while not list((wf / ".snakemake" / "locks").glob("*")) if (wf / ".snakemake" / "locks").exists() else True:
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.2)
    second = run_snakemake(wf, "--configfile", "config/tiny.yaml", check=False)
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-3000:]
    return wf, second


def test_second_run_on_same_directory_is_refused_by_the_lock(reference_build):
    _, second = reference_build
    assert second.returncode != 0
    assert "LockException" in second.stdout + second.stderr and "cannot be locked" in second.stdout + second.stderr


def test_sigkill_midway_then_rerun_gives_identical_bundles(reference_build, tmp_path):
    reference, _ = reference_build
    wf = copy_workflow(tmp_path)
    proc = _start(wf)
    plan = wf / "build" / TINY / "q4f16_0" / "weight-plan.json"
    deadline = time.time() + 120
    while not plan.exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run, mid-conversion
    proc.wait()
    assert not (wf / "dist").exists() or not all((wf / "dist" / f"{TINY}-{q}" / "MANIFEST.json").exists() for q in ("q0f16", "q4f16_0"))
    # Snakemake's documented recovery after a kill: release the stale lock, rerun incomplete jobs.
    run_snakemake(wf, "--configfile", "config/tiny.yaml", "--unlock")
    run_snakemake(wf, "--configfile", "config/tiny.yaml", "--rerun-incomplete")
    assert _manifest_shas(wf) == _manifest_shas(reference)


def test_malicious_pickle_never_runs_through_the_workflow(wf, tmp_path, fixtures_dir):
    import pickle
    import shutil

    marker = tmp_path / "pwned-by-pickle"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    model = tmp_path / "evil"
    shutil.copytree(fixtures_dir / "model", model)
    (model / "model.safetensors").unlink()
    with open(model / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"gpt_neox.embed_in.weight": Evil()}, handle)
    cfg = {"build_models": ["evil"], "models": {"evil": {"local_path": str(model), "revision": "v1", "conv_template": "line_llm"}}, "max_seq_len": 256}
    (wf / "evil.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(wf, "build/evil/q0f16/weight-plan.json", "--configfile", "evil.yaml", check=False)
    assert proc.returncode != 0
    log = (wf / "logs" / "evil" / "q0f16" / "weight_plan.log").read_text()
    assert "refusing to load" in log and "weights_only=True" in log
    assert not marker.exists()
    assert not (wf / "build" / "evil" / "q0f16" / "weight-plan.json").exists()


def test_thread_pools_follow_the_jobs_cpu_allotment():
    """On a shared node a job may run on 1 of many CPUs: pools sized by the node's count would
    oversubscribe it (TVM's spinning workers then slow decode by orders of magnitude)."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("CPU affinity is Linux-only")
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from neox_mlc.common import usable_cpus; print(usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
