"""Rule entry point; the step itself is ``neox_mlc.evaluate`` (also ``neox-mlc evaluate``)."""

from neox_mlc.common import run_cli
from neox_mlc.evaluate import main

if __name__ == "__main__":
    run_cli(main)
