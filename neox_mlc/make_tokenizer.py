"""Write the fast tokenizer (``tokenizer.json``) that MLC's runtime reads.

Why: MLC-LLM's iOS runtime needs ``tokenizer.json``; the LINE model ships a SentencePiece model
only. ``AutoTokenizer.from_pretrained(...).save_pretrained(..., legacy_format=False)`` is the
conversion transformers itself does. ``trust_remote_code`` stays off. A round-trip check on Japanese
text runs before the files are published, so a broken conversion never becomes an artifact.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


from neox_mlc.common import WorkflowError, atomic_path, check_output, run_cli

STEP = "make_tokenizer"
PROBE = "ユーザー: 日本の首都はどこですか?"


def make_tokenizer(model_dir: Path, out_dir: Path) -> None:
    check_output(out_dir, STEP, [model_dir])
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise WorkflowError(f"cannot load a tokenizer from {model_dir}: {str(err).splitlines()[0]}") from None
    if not tok.is_fast:
        raise WorkflowError(f"tokenizer in {model_dir} has no fast (tokenizer.json) form")
    ids = tok(PROBE, add_special_tokens=False)["input_ids"]
    if tok.decode(ids).strip() != PROBE.strip():
        raise WorkflowError(f"tokenizer from {model_dir} does not round-trip Japanese text: {tok.decode(ids)!r}")
    with atomic_path(out_dir, STEP, [model_dir]) as tmp:
        tok.save_pretrained(str(tmp), legacy_format=False)
        if not (tmp / "tokenizer.json").is_file():
            raise WorkflowError("save_pretrained wrote no tokenizer.json")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("-o", "--output", required=True, help="output directory")
    a = ap.parse_args(argv)
    make_tokenizer(Path(a.model_dir), Path(a.output))
    return 0


if __name__ == "__main__":
    run_cli(main)
