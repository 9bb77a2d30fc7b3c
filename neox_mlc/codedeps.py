"""Which source files a rule's step runs: its entry script plus every package module it imports.

Why: a rule's code is one of its inputs, so that editing the converter reruns exactly the artifacts
the converter made. A hand-kept list drifts (it did: gen_config lacked quantization.py); the
imports themselves do not, so the list is read from them — transitively, function-level imports
included, since several steps import heavy modules lazily.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "neox_mlc"


def _imported_modules(source: Path) -> set[str]:
    """Names of the package's modules that ``source`` imports anywhere (``neox_mlc.X`` -> ``X``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"), filename=str(source))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == PACKAGE:
                found.update(alias.name for alias in node.names)
            elif node.module.startswith(PACKAGE + "."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith(PACKAGE + "."))
    return found


def code_inputs(basedir: str | Path, entry: str) -> list[str]:
    """``entry`` (relative to ``basedir``) and the package modules it reaches, relative paths, sorted.

    The package's ``__init__.py`` is included: importing any module of it runs that file.
    """
    base = Path(basedir)
    package = base / PACKAGE
    seen: set[str] = set()
    todo = [base / entry]
    while todo:
        for name in _imported_modules(todo.pop()):
            path = package / f"{name}.py"
            if name not in seen and path.is_file():
                seen.add(name)
                todo.append(path)
    modules = [f"{PACKAGE}/__init__.py", *(f"{PACKAGE}/{m}.py" for m in sorted(seen))]
    return [entry, *modules]
