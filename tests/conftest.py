"""Shared fixtures: the MLC-LLM reference fixtures, converted caches and compiled libraries.

Compiling is the slow part (seconds per library), so each library is built once per session.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# What MLC-LLM itself wrote for a tiny GPT-NeoX (see its README). The team keeps the original in
# ../shared/fixtures/mlc-reference; this repository carries a byte-identical copy so that a clean
# clone tests itself wherever it is checked out (test_fixture_copy_matches_the_shared_original).
FIXTURES = Path(os.environ.get("MLC_REFERENCE_FIXTURES", REPO / "tests" / "fixtures" / "mlc-reference"))
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures" / "mlc-reference"
ALL_QUANTS = ["q0f32", "q0f16", "q4f16_0", "q4f16_1", "q4f32_1", "q3f16_1"]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "model" / "config.json").is_file():
        pytest.fail(f"MLC reference fixtures not found at {FIXTURES} (set MLC_REFERENCE_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def converted(tmp_path_factory, fixtures_dir):
    """quant -> params dir converted from the fixture checkpoint by this project."""
    from neox_mlc.convert_weight import convert

    root = tmp_path_factory.mktemp("converted")
    cache = {}

    def get(quant: str) -> Path:
        if quant not in cache:
            convert(fixtures_dir / "model", quant, root / quant)
            cache[quant] = root / quant
        return cache[quant]

    return get


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """(chat_config_path, quant, device) -> library path, built once per session."""
    from neox_mlc.compile import build
    from neox_mlc.layout import LIB_EXT

    root = tmp_path_factory.mktemp("libs")
    cache = {}

    def get(chat_config: Path, device: str = "llvm", prefix: str | None = None) -> Path:
        key = (str(chat_config), device)
        if key not in cache:
            out = root / f"lib{len(cache)}.{LIB_EXT[device]}"
            build(chat_config, device, out, prefix)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The workflow's tiny generated checkpoint (same generator and defaults as config/tiny.yaml)."""
    from neox_mlc.make_tiny_model import make_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    make_model(out, REPO / "data" / "corpus_ja.txt", 64, 2, 4, 256, 1024, 1024, 0.25, seed=0)
    return out


def run_snakemake(workdir: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real Snakemake CLI on a copy of the workflow in ``workdir``."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(workdir / "Snakefile"), "-d", str(workdir), "-c2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _workflow_sources() -> list[str]:
    """Top-level entries of the repository that make up the workflow: everything git tracks but tests and docs."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return sorted({p.split("/")[0] for p in tracked} - {"tests", "docs", ".ci", ".gitignore", "README.md", "SECURITY.md"})


WORKFLOW_SOURCES = _workflow_sources()


def copy_workflow(dest: Path) -> Path:
    """A fresh copy of the workflow sources (no outputs) to run Snakemake in."""
    from neox_mlc.benchtools import copy_workflow as copy_entries

    return copy_entries(dest, WORKFLOW_SOURCES)


def rule_blocks() -> dict[str, str]:
    """rule (or checkpoint) name -> its text, from rules/*.smk."""
    blocks = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=(?:checkpoint|rule) )", smk.read_text()):
            name = re.match(r"(?:checkpoint|rule) (\w+):", block)
            if name:
                blocks[name.group(1)] = block
    return blocks


def rule_entry_scripts() -> dict[str, str]:
    """rule name -> the entry script its shell command runs (``scripts/X.py``)."""
    found = {}
    for name, block in rule_blocks().items():
        entry = re.search(r"python (scripts/\w+\.py)", block)
        if entry:
            found[name] = entry.group(1)
    return found
