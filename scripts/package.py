"""Rule entry point; the step itself is ``neox_mlc.package`` (also ``neox-mlc package``)."""

from neox_mlc.common import run_cli
from neox_mlc.package import main

if __name__ == "__main__":
    run_cli(main)
