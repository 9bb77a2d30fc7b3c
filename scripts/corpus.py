"""Rule entry point; the step itself is ``neox_mlc.corpus``."""

from neox_mlc.common import run_cli
from neox_mlc.corpus import main

if __name__ == "__main__":
    run_cli(main)
