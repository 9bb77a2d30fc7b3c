"""Rule entry point; the step itself is ``neox_mlc.make_tokenizer`` (also ``neox-mlc make_tokenizer``)."""

from neox_mlc.common import run_cli
from neox_mlc.make_tokenizer import main

if __name__ == "__main__":
    run_cli(main)
