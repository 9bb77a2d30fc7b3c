"""Rule entry point; the step itself is ``neox_mlc.gen_config`` (also ``neox-mlc gen_config``)."""

from neox_mlc.common import run_cli
from neox_mlc.gen_config import main

if __name__ == "__main__":
    run_cli(main)
