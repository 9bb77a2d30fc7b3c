"""The tokenizer step on a SentencePiece-only checkpoint, as LINE's model ships (spiece.model, T5Tokenizer)."""

import json

import pytest

from neox_mlc.common import WorkflowError
from neox_mlc.make_tokenizer import PROBE, make_tokenizer

from conftest import REPO


@pytest.fixture(scope="module")
def spm_model_dir(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm-model")
    corpus = (REPO / "data" / "corpus_ja.txt").read_text(encoding="utf-8") + "\n" + PROBE + "\n"
    (d / "corpus.txt").write_text(corpus * 3, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=360, character_coverage=1.0,
        model_type="unigram", pad_id=3, unk_id=0, bos_id=1, eos_id=2, num_threads=1, minloglevel=2,
    )
    (d / "corpus.txt").unlink()
    (d / "spiece.vocab").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "unk_token": "<unk>", "eos_token": "</s>", "pad_token": "<pad>"}))
    return d


def test_sentencepiece_only_checkpoint_gets_a_fast_tokenizer_json(spm_model_dir, tmp_path):
    from tokenizers import Tokenizer

    make_tokenizer(spm_model_dir, tmp_path / "tok")
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    ids = tok.encode(PROBE, add_special_tokens=False).ids
    assert tok.decode(ids).strip() == PROBE


def test_directory_without_tokenizer_is_a_one_line_error(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(WorkflowError, match="cannot load a tokenizer from"):
        make_tokenizer(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_chat_config_tokenizer_info_for_a_sentencepiece_tokenizer(spm_model_dir, tmp_path):
    from neox_mlc.gen_config import tokenizer_info

    make_tokenizer(spm_model_dir, tmp_path / "tok")
    info = tokenizer_info(json.loads((tmp_path / "tok" / "tokenizer.json").read_text()))
    assert info == {"token_postproc_method": "byte_fallback", "prepend_space_in_encode": True, "strip_space_in_decode": True}
