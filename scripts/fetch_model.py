"""Rule entry point; the step itself is ``neox_mlc.fetch_model`` (also ``neox-mlc fetch_model``)."""

from neox_mlc.common import run_cli
from neox_mlc.fetch_model import main

if __name__ == "__main__":
    run_cli(main)
