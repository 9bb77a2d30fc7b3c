"""Rule entry point; the step itself is ``neox_mlc.compile`` (also ``neox-mlc compile``)."""

from neox_mlc.common import run_cli
from neox_mlc.compile import main

if __name__ == "__main__":
    run_cli(main)
