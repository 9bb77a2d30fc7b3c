"""tokenizer.json from a SentencePiece unigram model (``spiece.model``), faithful to SentencePiece itself.

Why not transformers' converter: for LINE's T5Tokenizer it hard-codes T5's unk id (every
out-of-vocabulary character became ``</s>``, id 2), drops byte fallback, and its ``Precompiled``
normalizer mis-handles 6-byte graphemes (half-width kana with a voiced mark, ``ｶﾞ``) and grapheme
clusters that start with a mapped character (the mark after ``ｚ`` is dropped). The reference is the
``sentencepiece`` library, and this module rebuilds SentencePiece's encoder from the model proto with
``tokenizers`` parts:

* normalizer: NFKC (for the NFKC rule families) and then the model's own precompiled character map,
  so HF's per-grapheme bugs never see an unnormalised sequence. Characters where plain NFKC disagrees
  with SentencePiece's map (``～`` U+FF5E, kept by ``nmt_nfkc``) are found by scanning the BMP
  against ``sentencepiece`` and shielded from NFKC with noncharacters U+FDD0.. (so only text that
  itself holds those noncharacters could differ). Then SentencePiece's whitespace rules: runs of
  spaces collapse, leading/trailing spaces go, one dummy-prefix space, spaces become ``▁``.
* pre-tokenizer: user-defined symbols, and runs of characters no normal piece contains, are isolated. In
  SentencePiece such a character is an unknown node on every path, so the best path splits there
  anyway; isolating it keeps control pieces (``</s>``, ``<0x41>``) that contain it unreachable.
* model: Unigram with the proto's scores and ids, ``unk_id`` from the proto, byte fallback as the
  proto says. Control, unknown, unused and byte pieces can never be matched from text in
  SentencePiece; here they get a score below any path of ordinary pieces, so a user typing
  ``</s>`` gets the text ``</s>`` (as SentencePiece does), not the end-of-sequence token.
* decoder: ``▁`` → space, byte pieces → bytes, the dummy-prefix space stripped.

:func:`check_faithful` compares ids with ``sentencepiece`` on given texts; the tokenizer step runs
it on every line of ``data/`` and :data:`TRICKY` before publishing.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from neox_mlc.common import WorkflowError

SPM_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
NFKC_RULES = ("nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf")
_SENTINELS = [chr(c) for c in range(0xFDD0, 0xFDF0)]  # noncharacters: never in interchanged text
# Prefixed to control and unknown pieces in the vocabulary so that no text can ever match them (the
# decoder strips it again). A low score alone is not enough: tokenizers scores an unknown character
# from the lowest score in the whole vocabulary, so a run of unknown characters spelling ``</s>``
# would still prefer the control piece.
_HIDDEN = "\uffff"
_UNK_PENALTY = 10.0  # SentencePiece's (and tokenizers') score of an unknown node below the minimum

# Strings where a converter can go wrong: widths, digits, emoji, whitespace, English, the LINE prompt,
# and text that looks like control or byte pieces.
TRICKY = (
    "ｶﾀｶﾅ ﾊﾝｶｸ ｷﾞｬﾙ ﾊﾟﾝ", "カタカナ ひらがな 漢字", "ＡＢＣ　ａｂｃ　１２３", "abc ABC 123 4.5e-6",
    "0123456789 ０１２３４５６７８９ 一二三", "絵文字😀🎉👍🏽🇯🇵", "tab\tseparated\tvalues", "line1\nline2\r\nline3",
    "  leading and   multiple   spaces  ", "Mixed English と 日本語 text, with punctuation!?", "10時～12時 〜 ~",
    "ユーザー: 日本の首都はどこですか?<NL>システム: ", "<NL>", "literal </s> and <s> and <unk> and <pad>",
    "<0x41> byte piece", "", " ", "①②③ ㍿ ㌔ ½ ﬁ", "é and e\u0301, が and か\u3099", "\u3000全角スペース\u3000",
    "zero\u200bwidth", "Ω≠ω ∑", "!!!???…", "https://example.com/path?q=1&x=2", "C++ / Rust_lang #tag @user",
)


def find_spm_model(model_dir: Path) -> Path | None:
    """The SentencePiece model file of a checkpoint, if it has one."""
    for name in SPM_FILES:
        if (Path(model_dir) / name).is_file():
            return Path(model_dir) / name
    return None


def load_proto(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError and others
        raise WorkflowError(f"{path} is not a SentencePiece model ({type(err).__name__})") from None
    if not proto.pieces:
        raise WorkflowError(f"{path} is not a SentencePiece model (no pieces)")
    return proto


def _check_supported(proto: Any, path: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    if proto.trainer_spec.model_type != pb.TrainerSpec.UNIGRAM:
        kind = pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise WorkflowError(f"{path}: SentencePiece model type {kind} is not supported; supported: UNIGRAM")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise WorkflowError(f"{path}: treat_whitespace_as_suffix is not supported; supported: whitespace as prefix")


def _char_class(chars: Iterable[str]) -> str:
    """An Oniguruma character class body listing ``chars`` as code-point ranges."""
    cps = sorted({ord(c) for c in chars})
    parts, i = [], 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        parts.append(f"\\x{{{cps[i]:X}}}" + (f"-\\x{{{cps[j]:X}}}" if j > i else ""))
        i = j + 1
    return "".join(parts)


def _vocab(proto: Any) -> tuple[list[tuple[str, float]], set[str], list[str], int]:
    """(pieces with Unigram scores, characters of normal pieces, user-defined symbols, unk id)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    kind = pb.ModelProto.SentencePiece
    normal = [p.score for p in proto.pieces if p.type == kind.NORMAL]
    if not normal:
        raise WorkflowError("SentencePiece model has no normal pieces")
    lowest = min(normal)
    longest = max(len(p.piece) for p in proto.pieces)
    # below any run of ordinary pieces or unknown nodes over the same characters: never chosen
    never = (longest + 1) * (lowest - _UNK_PENALTY) - 1.0
    # SentencePiece scores a user-defined node ``length * max_score + 1`` (max over normal pieces, at least 0)
    top = max(max(normal), 0.0)
    vocab, chars, user, unk = [], set(), [], None
    for i, p in enumerate(proto.pieces):
        if p.type == kind.NORMAL:
            vocab.append((p.piece, float(p.score)))
            chars.update(p.piece)
        elif p.type == kind.USER_DEFINED:
            vocab.append((p.piece, len(p.piece) * top + 1.0))
            user.append(p.piece)
        elif p.type == kind.BYTE:
            vocab.append((p.piece, never))  # byte fallback looks these up by their text
        else:
            vocab.append((_HIDDEN + p.piece, never))
            if p.type == kind.UNKNOWN:
                unk = i
    if unk is None:
        raise WorkflowError("SentencePiece model has no unknown piece")
    return vocab, chars, user, unk


def _normalizers(proto: Any, shields: dict[str, str]) -> list[Any]:
    from tokenizers import Regex, normalizers

    spec = proto.normalizer_spec
    steps: list[Any] = []
    if spec.name in NFKC_RULES:
        steps += [normalizers.Replace(c, s) for c, s in shields.items()]
        steps.append(normalizers.NFKC())
        steps += [normalizers.Replace(s, c) for c, s in shields.items()]
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("^ | $"), "")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    return steps


def _assemble(proto: Any, shields: dict[str, str]) -> Any:
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab, chars, user, unk = _vocab(proto)
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk, byte_fallback=bool(proto.trainer_spec.byte_fallback)))
    tok.normalizer = normalizers.Sequence(_normalizers(proto, shields))
    if proto.normalizer_spec.escape_whitespaces:
        chars.add("\u2581")
    symbols = [re.escape(u) for u in sorted(user, key=len, reverse=True)]
    unknown = f"[^{_char_class(chars)}]"
    if symbols:  # a run of unknown characters must not swallow the start of a symbol
        unknown = f"(?:(?!{'|'.join(symbols)}){unknown})"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join([*symbols, unknown + "+"])), behavior="isolated")
    steps = [decoders.Replace(_HIDDEN, ""), decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _nfkc_exceptions(proto: Any, sp: Any) -> list[str]:
    """BMP characters where NFKC followed by the model's map differs from SentencePiece alone."""
    probe = _assemble(proto, {}).normalizer
    out = []
    for cp in range(0x10000):
        c = chr(cp)
        if 0xD800 <= cp < 0xE000 or unicodedata.normalize("NFKC", c) == c:
            continue
        if probe.normalize_str(f"a{c}b") != sp.normalize(f"a{c}b"):
            out.append(c)
    return out


def build_tokenizer(spm_path: Path) -> tuple[Any, dict[str, Any]]:
    """The ``tokenizers.Tokenizer`` for ``spm_path`` and a report of what was built."""
    import sentencepiece as spm

    spm_path = Path(spm_path)
    proto = load_proto(spm_path)
    _check_supported(proto, spm_path)
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    shields: dict[str, str] = {}
    exceptions: list[str] = []
    if proto.normalizer_spec.name in NFKC_RULES:
        exceptions = _nfkc_exceptions(proto, sp)
        shields = dict(zip(exceptions, _SENTINELS, strict=False))
    tok = _assemble(proto, shields)
    report = {
        "source": spm_path.name,
        "pieces": len(proto.pieces),
        "normalizer": proto.normalizer_spec.name,
        "byte_fallback": bool(proto.trainer_spec.byte_fallback),
        "unk_id": proto.trainer_spec.unk_id,
        "nfkc_shielded": [f"U+{ord(c):04X}" for c in shields],
    }
    return tok, report


def check_faithful(tok: Any, spm_path: Path, texts: Iterable[str]) -> int:
    """Raise unless ``tok`` gives SentencePiece's ids for every text; returns how many were compared."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    n = 0
    for text in texts:
        want = sp.encode(text)
        got = tok.encode(text, add_special_tokens=False).ids
        if got != want:
            raise WorkflowError(
                f"tokenizer.json disagrees with sentencepiece on {text[:60]!r}: ids {got[:12]} vs {want[:12]}; "
                "refusing to publish an unfaithful tokenizer"
            )
        n += 1
    return n


def piece_id(tok: Any, piece: str) -> int | None:
    """The id of ``piece`` in a tokenizer, also where it is a control piece kept unmatchable (``</s>``)."""
    found = tok.token_to_id(piece)
    return found if found is not None else tok.token_to_id(_HIDDEN + piece)
