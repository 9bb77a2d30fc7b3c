"""Rule entry point; the step itself is ``neox_mlc.convert_weight`` (also ``neox-mlc convert_weight``)."""

from neox_mlc.common import run_cli
from neox_mlc.convert_weight import main

if __name__ == "__main__":
    run_cli(main)
