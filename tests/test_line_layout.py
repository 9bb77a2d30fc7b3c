"""The real LINE checkpoint's layout, tokenizer and stop tokens, end to end (issue #10).

A stand-in with LINE's config keys, token ids and files (``neox_mlc.line_fixture``: bool causal-mask
buffers, tied head, spiece.model only) is built through the CLI and the workflow, and its bundle chats.
The tokenizer is held to the ``sentencepiece`` library itself; the fetch step is tested with a local
checkpoint in an overlay config and with a populated Hugging Face cache under ``HF_HUB_OFFLINE=1``.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neox_mlc.common import WorkflowError

from conftest import REPO, copy_workflow, run_snakemake

REAL = "japanese-large-lm-3.6b-instruction-sft"
REAL_REPO = "line-corporation/japanese-large-lm-3.6b-instruction-sft"
CLI = str(Path(sys.executable).parent / "neox-mlc")
DATA_LINES = [ln for p in sorted((REPO / "data").glob("*.txt")) for ln in p.read_text(encoding="utf-8").splitlines()]


def cli(*args, cwd=REPO, env=None):
    import os

    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)


@pytest.fixture(scope="module")
def line_model(tmp_path_factory):
    """The tiny LINE-layout checkpoint (byte fallback, eos chain), written through the CLI."""
    out = tmp_path_factory.mktemp("line") / "model"
    proc = cli("line_fixture", "-o", str(out), "--byte-fallback", "--eos-chain")
    assert proc.returncode == 0, proc.stderr
    return out


# --- tokenizer: identical ids to sentencepiece


def _spm(tmp_path, **kw):
    import sentencepiece as spm

    corpus = "\n".join(DATA_LINES)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()), model_prefix=str(tmp_path / "spiece"), model_type="unigram",
        normalization_rule_name="nmt_nfkc", unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, minloglevel=2,
        hard_vocab_limit=False, **kw,
    )
    return tmp_path / "spiece.model"


SPM_VARIANTS = {
    "plain": {"vocab_size": 400, "character_coverage": 1.0},
    "byte_fallback": {"vocab_size": 700, "character_coverage": 0.995, "byte_fallback": True},
    "user_symbol": {"vocab_size": 700, "character_coverage": 0.995, "byte_fallback": True, "user_defined_symbols": ["<NL>"]},
}


@pytest.mark.parametrize("variant", list(SPM_VARIANTS))
def test_tokenizer_json_gives_sentencepiece_ids(variant, tmp_path):
    import sentencepiece as spm

    from neox_mlc.spm_tokenizer import TRICKY, build_tokenizer

    model = _spm(tmp_path, **SPM_VARIANTS[variant])
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok, _ = build_tokenizer(model)
    extra = ["😀<NL>x", "<NL><NL>", "ｶﾞ" * 3, "～" * 4, "\t \n"]
    for text in [*DATA_LINES, *TRICKY, *extra]:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
    ids = tok.encode("絵文字😀", add_special_tokens=False).ids
    if SPM_VARIANTS[variant].get("byte_fallback"):
        assert [sp.id_to_piece(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # byte fallback kept
        assert tok.decode(ids) == "絵文字😀"
    else:
        assert ids[-1] == 0 and 2 not in ids  # out of vocabulary: <unk> (0), never </s> (2)
    assert 2 not in tok.encode("literal </s>", add_special_tokens=False).ids  # typed text stays text, as in sentencepiece


def test_transformers_conversion_is_refused_by_the_check(tmp_path):
    """transformers' T5 conversion (the old path) maps unknown characters to </s>: the check stops it."""
    from transformers import AutoTokenizer

    from neox_mlc.spm_tokenizer import TRICKY, check_faithful

    model = _spm(tmp_path, **SPM_VARIANTS["plain"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    fast = AutoTokenizer.from_pretrained(str(tmp_path), use_fast=True).backend_tokenizer
    with pytest.raises(WorkflowError, match="disagrees with sentencepiece"):
        check_faithful(fast, model, [*DATA_LINES, *TRICKY])


def test_unfaithful_tokenizer_is_never_published(line_model, tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models

    from neox_mlc import make_tokenizer as mt

    monkeypatch.setattr(mt, "build_tokenizer", lambda path: (Tokenizer(models.Unigram([("<unk>", 0.0)], 0)), {}))
    with pytest.raises(WorkflowError, match="refusing to publish"):
        mt.make_tokenizer(line_model, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


# --- the converter on the real layout


def _convert(model, out):
    proc = cli("convert_weight", str(model), "--quantization", "q4f16_0", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_buffers_are_skipped_and_named_and_every_layout_converts_alike(line_model, tmp_path):
    """Tied safetensors, + embed_out.weight, and pytorch_model.bin: the same parameters, byte for byte."""
    log = _convert(line_model, tmp_path / "a")
    assert "skipped 6 non-weight tensor(s): 2 x gpt_neox.layers.N.attention.bias, 2 x gpt_neox.layers.N.attention.masked_bias" in log
    for flags in (["--embed-out"], ["--weights", "bin"]):
        other = tmp_path / f"m{len(flags)}"
        assert cli("line_fixture", "-o", str(other), "--byte-fallback", "--eos-chain", *flags).returncode == 0
        out = _convert(other, tmp_path / f"{other.name}-p")
        if "--embed-out" in flags:
            assert "1 x embed_out.weight (tied to gpt_neox.embed_in.weight)" in out
        for shard in (tmp_path / "a").glob("params_shard_*.bin"):
            assert (tmp_path / f"{other.name}-p" / shard.name).read_bytes() == shard.read_bytes()


def test_unknown_tensor_is_a_one_line_error(tmp_path):
    import numpy as np

    from neox_mlc.line_fixture import line_config, make_tensor, tensor_specs, write_safetensors

    cfg = line_config(64, 1, 4, 256, 400, 64)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg))
    specs = tensor_specs(cfg, embed_out=False) + [("gpt_neox.layers.0.attention.lora_A", (4, 64), np.dtype(np.float16))]
    write_safetensors(model / "model.safetensors", specs, lambda i, n, s, d: make_tensor(n, s, d, 0, i))
    proc = cli("convert_weight", str(model), "--quantization", "q4f16_0", "-o", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        (
            "error: checkpoint tensor gpt_neox.layers.0.attention.lora_A is neither a GPT-NeoX weight nor a known buffer "
            "(attention.bias, attention.masked_bias, rotary_emb.inv_freq); refusing to convert without it"
        )
    ]
    assert not (tmp_path / "out").exists()


# --- the workflow end to end on the stand-in, through the CLI


@pytest.fixture(scope="module")
def line_build(tmp_path_factory):
    wf = copy_workflow(tmp_path_factory.mktemp("line-wf"))
    proc = cli("line_fixture", "-o", "resources/line-layout-fixture", "--byte-fallback", "--eos-chain", cwd=wf)
    assert proc.returncode == 0, proc.stderr
    run_snakemake(wf, "--configfile", "config/line-layout.yaml")
    return wf


def test_line_layout_builds_and_logs_what_it_skipped_and_checked(line_build):
    assert (line_build / "dist" / "line-layout-q4f16_0" / "MANIFEST.json").is_file()
    assert "skipped 6 non-weight tensor(s)" in (line_build / "logs/line-layout/q4f16_0/weight_plan.log").read_text()
    tok_log = (line_build / "logs/line-layout/tokenizer.log").read_text()
    assert f"identical ids to sentencepiece on {len(DATA_LINES) + 26} texts" in tok_log
    assert "byte_fallback True, unk id 0" in tok_log


def test_bundle_chats_and_stops_at_eos(line_build):
    """The stand-in's greedy reply is one token ("。"), then </s> (id 2): the chat ends there."""
    cfg = json.loads((line_build / "build/line-layout/q4f16_0/mlc-chat-config.json").read_text())
    assert cfg["conv_template"]["stop_token_ids"] == [3, 0, 2] and cfg["eos_token_id"] == 2
    proc = cli("chat", "dist/line-layout-q4f16_0", "--prompt", "こんにちは", "--max-tokens", "8", cwd=line_build)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "。\n"


def test_runner_stops_on_the_chat_configs_stop_ids(line_build):
    from tokenizers import Tokenizer

    from neox_mlc.chat import format_prompt
    from neox_mlc.evaluate import greedy_runtime
    from neox_mlc.runtime import ModelRuntime

    q = line_build / "build/line-layout/q4f16_0"
    cfg = json.loads((q / "mlc-chat-config.json").read_text())
    tok = Tokenizer.from_file(str(line_build / "build/line-layout/tokenizer/tokenizer.json"))
    rt = ModelRuntime(next((q / "lib").glob("*-llvm.so")), q / "params", q / "mlc-chat-config.json")
    ids = tok.encode(format_prompt(cfg["conv_template"], [], "こんにちは"), add_special_tokens=False).ids
    reply = greedy_runtime(rt, ids, 6, set(cfg["conv_template"]["stop_token_ids"]))
    assert tok.decode(reply) == "。" and len(reply) == 1
    # the template's own stop ids [3, 0] alone would let the model run on past </s>
    assert greedy_runtime(rt, ids, 3, {3, 0})[1:] == [2, 2]


# --- a model already on disk: local_path in an overlay or on the command line, or the HF cache offline


@pytest.fixture()
def wf(tmp_path):
    (tmp_path / "wf").mkdir()
    return copy_workflow(tmp_path / "wf")


def _planned(out):
    return "Job stats" in out and "model_config" in out and "fetch_model" in out


def test_local_path_overlay_and_command_line_point_the_real_model_at_a_directory(wf, line_model):
    (wf / "local.yaml").write_text(yaml.safe_dump({"models": {REAL: {"local_path": str(line_model)}}, "max_seq_len": 256}))
    out = run_snakemake(wf, "-n", "-p", f"dist/{REAL}-q4f16_0", "--configfile", "local.yaml").stdout
    assert _planned(out) and f"--local-path {line_model} --revision main -o resources/models/{REAL}" in out
    cmdline = "models={" + REAL + ": {local_path: " + str(line_model) + "}}"
    out = run_snakemake(wf, "-n", "-p", f"dist/{REAL}-q4f16_0", "--config", cmdline, "max_seq_len=256").stdout
    assert _planned(out) and f"--local-path {line_model}" in out


def _hf_cache(root: Path, model: Path, sha: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """A Hugging Face hub cache holding ``model`` as REAL_REPO@main (blobs + snapshot symlinks, as the hub writes)."""
    import hashlib
    import os

    repo = root / ("models--" + REAL_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "blobs").mkdir()
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in model.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return root


def test_hf_cache_offline_fetches_without_network_and_bad_max_seq_len_stops_before_the_download(wf, line_model, tmp_path):
    cache = _hf_cache(tmp_path / "hub", line_model)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    target = f"resources/models/{REAL}/snapshot.json"
    proc = run_snakemake(wf, target, "--config", "max_seq_len=1024", check=False, env=env)
    assert proc.returncode != 0
    assert f"model '{REAL}': context window (max_seq_len) 1024 is out of range; allowed: 1..512" in proc.stdout + proc.stderr
    assert (wf / "resources/configs" / REAL / "config.json").is_file()  # one small file moved...
    assert not (wf / "resources/models" / REAL).exists()  # ...the weights did not
    # the next plan knows the limit already: one line, exit 2, no job
    proc = run_snakemake(wf, "-n", "--config", "max_seq_len=1024", check=False, env=env)
    assert proc.returncode == 2 and "Job stats" not in proc.stdout
    run_snakemake(wf, target, "--config", "max_seq_len=256", env=env)
    snap = json.loads((wf / target).read_text())
    assert snap["source"] == f"hf://{REAL_REPO}" and snap["resolved_revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert {"model.safetensors", "spiece.model", "config.json"} <= set(snap["files"])


def test_hf_cache_offline_without_the_model_is_one_line(tmp_path):
    proc = cli("fetch", "--hf-repo", REAL_REPO, "-o", str(tmp_path / "out"), env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        (
            f"error: HF_HUB_OFFLINE=1 and the snapshot of {REAL_REPO}@main is not in the Hugging Face cache {tmp_path / 'empty'}; "
            "download it once with network access, or set local_path to a checkpoint directory"
        )
    ]


def test_quality_reference_reads_the_real_layout(line_model):
    """The gguf peers and the float32 reference load a tied checkpoint whose file holds buffers."""
    from neox_mlc.evaluate import gguf_dequantized_state
    from neox_mlc.reference import load_hf_model

    state, _, bits = gguf_dequantized_state(line_model, "Q8_0")
    assert not any("attention.bias" in n or "inv_freq" in n for n in state) and 8 < bits < 9
    model = load_hf_model(line_model, state)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_bench_line_never_deletes_a_workdir_it_did_not_make(tmp_path):
    from neox_mlc.bench_line import prepare

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("a user's file")
    with pytest.raises(WorkflowError, match=r"^--workdir .*mine is not empty and was not made by bench_line; allowed: an empty or new directory$"):
        prepare(mine, {"hidden": 96, "layers": 1, "heads": 1, "inter": 384, "max_pos": 2048, "vocab": 51200})
    assert (mine / "thesis.txt").read_text() == "a user's file"
