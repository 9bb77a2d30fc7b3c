"""Write the fast tokenizer (``tokenizer.json``) that MLC's runtime reads.

Why: MLC-LLM's iOS runtime needs ``tokenizer.json``; the LINE model ships a SentencePiece model
only. A checkpoint that has a ``tokenizer.json`` keeps it (``AutoTokenizer`` + ``save_pretrained``,
``trust_remote_code`` off). A SentencePiece-only checkpoint gets one built from its model proto by
:mod:`neox_mlc.spm_tokenizer` (transformers' T5 conversion maps unknown characters to ``</s>`` and
drops byte fallback), and its ids are compared with the ``sentencepiece`` library on every line of
the ``--check-text`` files and a tricky set before anything is published, so an unfaithful or broken
conversion never becomes an artifact.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from neox_mlc.common import WorkflowError, atomic_path, check_output, run_cli
from neox_mlc.spm_tokenizer import TRICKY, build_tokenizer, check_faithful, find_spm_model

STEP = "make_tokenizer"
PROBE = "ユーザー: 日本の首都はどこですか?"


def check_lines(paths: Sequence[Path]) -> list[str]:
    """Every line of the given text files (the comparison corpus), read as UTF-8."""
    lines: list[str] = []
    for path in paths:
        if not Path(path).is_file():
            raise WorkflowError(f"check text {path} not found")
        lines += Path(path).read_text(encoding="utf-8").splitlines()
    return lines


def make_tokenizer(model_dir: Path, out_dir: Path, check_texts: Sequence[Path] = ()) -> None:
    """Publish ``out_dir/tokenizer.json``; SentencePiece-only checkpoints go through the faithful builder."""
    check_output(out_dir, STEP, [model_dir])
    spm_path = find_spm_model(model_dir)
    if spm_path is not None and not (Path(model_dir) / "tokenizer.json").is_file():
        _from_sentencepiece(spm_path, out_dir, check_lines(check_texts))
    else:
        _from_transformers(model_dir, out_dir)


def _from_sentencepiece(spm_path: Path, out_dir: Path, lines: list[str]) -> None:
    tok, report = build_tokenizer(spm_path)
    compared = check_faithful(tok, spm_path, [*lines, *TRICKY, PROBE])
    decoded = tok.decode(tok.encode(PROBE, add_special_tokens=False).ids)
    if decoded != PROBE:
        raise WorkflowError(f"tokenizer from {spm_path} does not round-trip Japanese text: {decoded!r}")
    with atomic_path(out_dir, STEP, [spm_path.parent]) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        tok.save(str(tmp / "tokenizer.json"))
    print(f"tokenizer.json built from {report['source']}: {report['pieces']} pieces, normalizer {report['normalizer']}, "
          f"byte_fallback {report['byte_fallback']}, unk id {report['unk_id']}, NFKC shielded {report['nfkc_shielded']}")
    print(f"identical ids to sentencepiece on {compared} texts ({len(lines)} check lines, {len(TRICKY)} tricky strings, the probe)")


def _from_transformers(model_dir: Path, out_dir: Path) -> None:
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
    ap.add_argument("--check-text", nargs="+", action="extend", default=[], metavar="FILE",
                    help="text files whose every line must encode as sentencepiece does")
    a = ap.parse_args(argv)
    make_tokenizer(Path(a.model_dir), Path(a.output), [Path(p) for p in a.check_text])
    return 0


if __name__ == "__main__":
    run_cli(main)
