"""Rule entry point; the step itself is ``neox_mlc.train_neox``."""

from neox_mlc.common import run_cli
from neox_mlc.train_neox import main

if __name__ == "__main__":
    run_cli(main)
