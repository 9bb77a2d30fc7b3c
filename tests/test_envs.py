"""The conda envs (for ``--sdm conda``) agree with requirements.txt and cover what their rules import.

Creating three conda environments with torch and TVM does not fit CI's time, so the envs are checked
statically instead: every pin equals requirements.txt's (one version of each package everywhere), and
every third-party module imported by a rule's code (its entry script and the package modules it
reaches) comes from a distribution the rule's env installs.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import yaml

from neox_mlc.codedeps import code_inputs

from conftest import rule_blocks, rule_entry_scripts

REPO = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s#]+)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines: list[str]) -> dict[str, str]:
    return {_norm(m.group(1)): m.group(2) for line in lines if (m := PIN.match(line.strip()))}


def _env_pins(env_file: Path) -> dict[str, str]:
    spec = yaml.safe_load(env_file.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    return _pins(pip)


def _rule_envs() -> dict[str, tuple[str, str]]:
    """rule name -> (env file, entry script) read from the rule files."""
    entries, found = rule_entry_scripts(), {}
    for name, block in rule_blocks().items():
        env = re.search(r'conda:\s*\n\s*"\.\./(envs/[\w.]+)"', block)
        if env and name in entries:
            found[name] = (env.group(1), entries[name])
    return found


def _imported(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _optional(tree: ast.AST) -> set[str]:
    """Modules imported inside ``try: ... except ImportError``: optional extras, not env requirements."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            for stmt in node.body:
                names |= _imported(stmt)
    return names


def _third_party_imports(paths: list[str]) -> set[str]:
    names: set[str] = set()
    for rel in paths:
        tree = ast.parse((REPO / rel).read_text())
        names |= _imported(tree) - _optional(tree)
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("neox_mlc", "__future__")}


REQUIREMENTS = _pins((REPO / "requirements.txt").read_text().splitlines())
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_pins_equal_requirements(env_file):
    pins = _env_pins(env_file)
    assert pins, f"{env_file.name} pins nothing"
    assert {k: v for k, v in pins.items() if REQUIREMENTS.get(k) != v} == {}


def test_every_rule_env_installs_what_its_code_imports():
    dists = importlib.metadata.packages_distributions()
    rules = _rule_envs()
    assert {"fetch_model", "tokenizer", "weight_plan", "convert_shard", "gen_config", "compile", "package"} <= set(rules)
    missing = {}
    for rule, (env, entry) in rules.items():
        pins = _env_pins(REPO / env)
        for module in _third_party_imports(code_inputs(REPO, entry)):
            providers = {_norm(d) for d in dists.get(module, [])}
            assert providers, f"{module} (imported by {rule}'s code) is not installed here"
            if not providers & set(pins):
                missing.setdefault(f"{rule} ({env})", []).append(module)
    assert missing == {}
