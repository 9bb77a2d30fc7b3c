"""Entry point: check a bundle (or params folder) on its own; the step is ``neox_mlc.verify`` (``neox-mlc verify``)."""

from neox_mlc.common import run_cli
from neox_mlc.verify import main

if __name__ == "__main__":
    run_cli(main)
