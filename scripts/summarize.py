"""Rule entry point; the step itself is ``neox_mlc.summarize`` (also ``neox-mlc summarize``)."""

from neox_mlc.common import run_cli
from neox_mlc.summarize import main

if __name__ == "__main__":
    run_cli(main)
