"""A rule's code inputs are derived from the imports (neox_mlc/codedeps.py), checked against Python's own
import scanner (modulefinder, which reads the compiled bytecode, function-level imports included)."""

from __future__ import annotations

import modulefinder
from pathlib import Path

import pytest

from neox_mlc.codedeps import code_inputs

REPO = Path(__file__).resolve().parent.parent
ENTRIES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "scripts").glob("*.py"))


class _PackageOnly(modulefinder.ModuleFinder):
    """Follows imports of the project's package only (scanning torch or TVM would take minutes)."""

    def import_hook(self, name, caller=None, fromlist=None, level=-1):
        if name == "neox_mlc" or name.startswith("neox_mlc."):
            return super().import_hook(name, caller, fromlist, level)
        return None


def _oracle(entry: str) -> list[str]:
    finder = _PackageOnly(path=[str(REPO)])
    finder.run_script(str(REPO / entry))
    modules = {m.__file__ for name, m in finder.modules.items() if name.startswith("neox_mlc") and m.__file__}
    return sorted(Path(f).relative_to(REPO).as_posix() for f in modules)


@pytest.mark.parametrize("entry", ENTRIES)
def test_code_inputs_equal_python_import_scanner(entry):
    derived = code_inputs(REPO, entry)
    assert derived[0] == entry
    assert sorted(derived[1:]) == _oracle(entry)


def test_the_modules_the_hand_kept_map_had_lost_are_inputs():
    # the old CODE map in rules/common.smk had drifted exactly here (issue #13)
    assert "neox_mlc/quantization.py" in code_inputs(REPO, "scripts/gen_config.py")
    evaluate = code_inputs(REPO, "scripts/evaluate.py")
    assert {"neox_mlc/hf_checkpoint.py", "neox_mlc/tensor_cache.py"} <= set(evaluate)
