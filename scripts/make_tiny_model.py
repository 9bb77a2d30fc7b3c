"""Rule entry point; the step itself is ``neox_mlc.make_tiny_model`` (also ``neox-mlc make_tiny_model``)."""

from neox_mlc.common import run_cli
from neox_mlc.make_tiny_model import main

if __name__ == "__main__":
    run_cli(main)
