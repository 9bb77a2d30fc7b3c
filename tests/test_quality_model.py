"""The evaluation model (issue #16): corpus preparation, the trainer, bootstrap intervals, readable plots, verdicts."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from neox_mlc.common import WorkflowError
from neox_mlc.corpus import deb_members, is_heldout, prepare, roff_to_text
from neox_mlc.evaluate import aggregate, bootstrap_ci, compare, position_metrics, text_ids, unigram_baseline
from neox_mlc.llamacpp import llama_python

from conftest import REPO

# ---------------------------------------------------------------- roff -> text

MAN_PAGE = r""".\" comment: never text
.de XX
.B hidden macro body
..
.TH LS 1 "2021年5月" "GNU coreutils"
.SH 名前
ls \- ディレクトリの内容を
リスト表示する
.SH 書式
.B ls
[\fI\,オプション\/\fR]...
.TP
\fB\-a\fR, \fB\-\-all\fR
\&. で始まる要素を無視しない
.PP
詳しくは
.BR dir (1)
を参照。\(lq引用\(rq \[u3042]
"""

MDOC_PAGE = r""".Dd 2001
.Dt ACHFILE 1
.Sh 名称
.Nm achfile
.Nd タイプを変更する
.Sh 書式
.Nm
.Op Fl t Ar type
.Sh 関連項目
.Xr afile 1 ,
.Xr afpd 8
"""


def test_roff_to_text_keeps_running_text_and_drops_requests():
    assert roff_to_text(MAN_PAGE) == [
        "名前",
        "ls - ディレクトリの内容をリスト表示する",  # Japanese lines join without a space
        "書式",
        "ls [オプション]...",
        "-a, --all . で始まる要素を無視しない",  # a .TP tag and its body: one paragraph
        "詳しくは dir(1) を参照。“引用” あ",
    ]


def test_roff_to_text_reads_mdoc_pages():
    paras = roff_to_text(MDOC_PAGE)
    assert paras[0] == "名称"
    assert "achfile タイプを変更する" in paras
    assert any("type" in p for p in paras) and not any(p.startswith(".") for p in paras)  # flags lose their "-" (mdoc: rare here)
    assert paras[-1] == "afile(1), afpd(8)"


# ---------------------------------------------------------------- the package and the split


def _deb(path: Path, pages: dict[str, str], copyright_text: str = "licence text\n") -> Path:
    """A real .deb layout (ar: debian-binary, control.tar.xz, data.tar.xz) with gzipped man pages."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        files = {f"./usr/share/man/ja/{name}.gz": gzip.compress(text.encode(), mtime=0) for name, text in pages.items()}
        files["./usr/share/doc/manpages-ja/copyright"] = copyright_text.encode()
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(b"")), ("data.tar.xz", lzma.compress(data.getvalue()))]
    blob = b"!<arch>\n"
    for name, content in members:
        blob += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n".encode() + content + (b"\n" if len(content) % 2 else b"")
    path.write_bytes(blob)
    return path


def test_deb_reader_matches_dpkg(tmp_path):
    deb = _deb(tmp_path / "p.deb", {"man1/ls.1": MAN_PAGE})
    members = deb_members(deb)
    assert set(members) == {"./usr/share/man/ja/man1/ls.1.gz", "./usr/share/doc/manpages-ja/copyright"}
    out = tmp_path / "x"
    if subprocess.run(["dpkg-deb", "-x", str(deb), str(out)], capture_output=True, check=False).returncode == 0:
        assert (out / "usr/share/man/ja/man1/ls.1.gz").read_bytes() == members["./usr/share/man/ja/man1/ls.1.gz"]


def test_prepare_splits_whole_pages_and_never_both(tmp_path):
    names = [f"man1/cmd{i}.1" for i in range(40)]
    deb = _deb(tmp_path / "p.deb", {n: MAN_PAGE.replace("ls", f"cmd{i}") for i, n in enumerate(names)})
    stats = prepare(deb, "manpages-ja", 20, tmp_path / "out")
    train = (tmp_path / "out" / "train.txt").read_text().splitlines()
    heldout = (tmp_path / "out" / "heldout.txt").read_text().splitlines()
    assert len(train) + len(heldout) == 40 and heldout and train
    assert set(stats["heldout"]["page_names"]) == {n for n in names if is_heldout(n, 20)}
    assert not set(train) & set(heldout)
    assert all(line.startswith("名前<NL>") for line in train + heldout)  # <NL> between paragraphs
    assert (tmp_path / "out" / "copyright").read_text() == "licence text\n"
    again = prepare(deb, "manpages-ja", 20, tmp_path / "again")
    assert again["heldout"]["page_names"] == stats["heldout"]["page_names"]


def test_prepare_refuses_bad_split_and_non_debs(tmp_path):
    deb = _deb(tmp_path / "p.deb", {"man1/ls.1": MAN_PAGE})
    with pytest.raises(WorkflowError, match="heldout_pct 0 is out of range; allowed: 1..50"):
        prepare(deb, "manpages-ja", 0, tmp_path / "o")
    (tmp_path / "bad.deb").write_bytes(b"not an archive")
    with pytest.raises(WorkflowError, match="is not a Debian package"):
        prepare(tmp_path / "bad.deb", "manpages-ja", 5, tmp_path / "o")


# ---------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two trainings with the same spec (tiny sizes), to check LINE's choices and reproducibility."""
    from neox_mlc.train_neox import TrainSpec, build

    d = tmp_path_factory.mktemp("train")
    text = d / "train.txt"
    pages = [f"名前<NL>cmd{i} - ファイルを{i}回コピーする<NL>説明<NL>ユーザー: 日本の首都はどこですか? 表示します。" for i in range(60)]
    text.write_text("\n".join(pages) + "\n", encoding="utf-8")
    spec = TrainSpec(vocab_size=340, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seq_len=32, batch_size=4, steps=3)
    build(text, spec, d / "a")
    build(text, spec, d / "b")
    return d


def test_tokenizer_is_like_lines(trained):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    sp = spm.SentencePieceProcessor(model_file=str(trained / "a" / "spiece.model"))
    assert [sp.id_to_piece(i) for i in range(5)] == ["<unk>", "<s>", "</s>", "<pad>", "<NL>"]
    proto = pb.ModelProto()
    proto.ParseFromString((trained / "a" / "spiece.model").read_bytes())
    assert proto.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM
    assert proto.normalizer_spec.name == "nfkc" and proto.trainer_spec.byte_fallback
    assert json.loads((trained / "a" / "tokenizer_config.json").read_text())["tokenizer_class"] == "T5Tokenizer"


def test_model_has_lines_architecture_and_is_reproducible(trained):
    cfg = json.loads((trained / "a" / "config.json").read_text())
    assert cfg["use_parallel_residual"] is False and cfg["tie_word_embeddings"] is True
    assert cfg.get("rope_parameters", cfg)["partial_rotary_factor" if "rope_parameters" in cfg else "rotary_pct"] == 1.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 2, 3)
    a, b = (trained / x / "model.safetensors" for x in "ab")
    assert a.read_bytes() == b.read_bytes()
    assert (trained / "a" / "spiece.model").read_bytes() == (trained / "b" / "spiece.model").read_bytes()
    record = json.loads((trained / "a" / "training.json").read_text())
    assert len(record["loss_curve"]) == 3 and record["tokens_seen"] == 3 * 4 * 32


def test_workflow_tokenizer_step_encodes_as_sentencepiece(trained, tmp_path):
    """The tokenizer rule's conversion of the trained spiece.model gives the ids training used."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    from neox_mlc.make_tokenizer import make_tokenizer

    make_tokenizer(trained / "a", tmp_path / "tok")
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(trained / "a" / "spiece.model"))
    for line in (trained / "train.txt").read_text().splitlines()[:5]:
        assert tok.encode(line, add_special_tokens=False).ids == sp.encode(line)
    ids = text_ids(tok, "表示します\n\n表示します\n")  # one document per non-empty line, each closed by </s>
    assert ids == [*sp.encode("表示します"), 2] * 2


def test_trainer_rejects_bad_specs_in_one_line(tmp_path):
    from neox_mlc.train_neox import TrainSpec, build

    (tmp_path / "t.txt").write_text("日本語の文章です。" * 50 + "\n", encoding="utf-8")
    with pytest.raises(WorkflowError, match="hidden_size 30 is not a multiple of num_heads 4"):
        build(tmp_path / "t.txt", TrainSpec(hidden_size=30, num_heads=4), tmp_path / "o")
    with pytest.raises(WorkflowError, match="sentencepiece cannot train vocab_size 10 on"):
        build(tmp_path / "t.txt", TrainSpec(vocab_size=10), tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- intervals and baseline


def _logits(seed: int, n: int = 400, vocab: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((n, vocab)) * 2
    return ref, rng.integers(0, vocab, n)


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_to_zero_for_identical_models():
    ref, targets = _logits(0)
    same = compare(ref, ref, targets, [40] * 10)
    assert same["delta_ppl_ci95"] == (0.0, 0.0) and same["kl_mean_ci95"] == (0.0, 0.0)
    noisy = compare(ref, ref + np.random.default_rng(1).standard_normal(ref.shape), targets, [40] * 10)
    lo, hi = noisy["delta_ppl_ci95"]
    assert lo < noisy["delta_ppl"] < hi
    assert noisy["kl_mean_ci95"][0] < noisy["kl_mean"] < noisy["kl_mean_ci95"][1]
    assert sum(noisy["chunks"]["tokens"]) == 400
    assert np.isclose(sum(noisy["chunks"]["kl"]) / 400, noisy["kl_mean"])


def test_a_systematic_loss_is_outside_noise():
    ref, _ = _logits(2)
    targets = ref.argmax(-1)
    worse = ref.copy()
    worse[np.arange(len(targets)), targets] -= 1.0  # every target token loses probability
    lo = compare(ref, worse, targets, [20] * 20)["delta_ppl_ci95"][0]
    assert lo > 0


def test_bootstrap_ci_known_spread():
    sums = {"x": np.array([1.0, 3.0]), "n": np.array([1.0, 1.0])}
    lo, hi = bootstrap_ci(lambda s: s["x"] / s["n"], sums, samples=4000)
    assert (lo, hi) == (1.0, 3.0)  # resamples of two chunks: means 1, 2 or 3


def test_aggregate_equals_compare():
    ref, targets = _logits(3)
    test = ref + 0.3
    test[:, 0] += 1
    pos = position_metrics(ref, test, targets)
    assert aggregate(pos, [100] * 4) == compare(ref, test, targets, [100] * 4)


def test_unigram_baseline_known_answer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2, "c": 3}, unk_token="c"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # training counts a:5 b:1 </s>:2 c:0, plus one each -> p = 6/12, 2/12, 3/12, 1/12
    result = unigram_baseline(tok, "a a a b\na a\n", "a b\n", window=8, max_tokens=100)
    expected = np.exp(-(np.log(2 / 12) + np.log(3 / 12)) / 2)  # scored: b, </s>
    assert result["ppl_unigram"] == pytest.approx(expected) and result["scored_tokens"] == 2


# ---------------------------------------------------------------- summary: plot and verdicts


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """quality.json files of nine methods (two pairs at the very same size), from ``compare`` on known logits."""
    from neox_mlc.common import write_json

    d = tmp_path_factory.mktemp("reports")
    ref, targets = _logits(4, n=600, vocab=80)
    modes = [("mlc q0f32", 32.0, 0.001), ("mlc q0f16", 16.04, 0.003), ("gguf Q8_0 (numpy)", 8.56, 0.02),
             ("gguf Q4_1 (numpy)", 5.09, 0.2), ("mlc q4f32_1", 5.21, 0.2), ("gguf Q4_0 (numpy)", 4.59, 0.25),
             ("mlc q4f16_0", 4.63, 0.25), ("mlc q4f16_1", 4.63, 0.25), ("mlc q3f16_1", 4.55, 1.5)]  # fmt: skip
    paths = []
    for i, (method, bits, noise) in enumerate(modes):
        test = ref + np.random.default_rng(10 + i).standard_normal(ref.shape) * noise
        q = method.split()[1]
        answers = [{"prompt": "ls とは?", "bundle": f"{q} の答え", "reference": "参照の答え"}]
        write_json(d / f"{q}.json", {"method": method, "quantization": q, "bits_per_param": bits, **compare(ref, test, targets, [30] * 20), "answers": answers})
        paths.append(d / f"{q}.json")
    write_json(d / "unigram.json", {"ppl_unigram": 80.0, "ppl_unigram_ci95": [78.0, 82.0]})
    return d, paths


def test_plot_has_no_overlapping_labels_and_says_what_is_better(reports, tmp_path):
    from neox_mlc.summarize import label_boxes, plot, rows

    table = rows(reports[1])
    fig = plot(tmp_path / "q.png", table, "synthetic", "subtitle")
    boxes = label_boxes(fig)
    ticks = [(t, b) for t, b in boxes if "bits" in t]
    assert len(ticks) == 9  # one row per method, however close their sizes
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1 :]:
            assert not a.overlaps(b), f"{ta!r} overlaps {tb!r}"
    xlabels = [ax.get_xlabel() for ax in fig.axes]
    assert all("better" in x for x in xlabels) and "95 %" in xlabels[1]
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_markdown_and_verdicts_come_from_the_numbers(reports, tmp_path):
    d, paths = reports
    argv = [str(p) for p in paths] + ["--csv", str(tmp_path / "s.csv"), "--png", str(tmp_path / "s.png"), "--markdown", str(tmp_path / "s.md")]
    subprocess.run([sys.executable, str(REPO / "scripts" / "summarize.py"), *argv, "--baseline", str(d / "unigram.json"), "--title", "t"], check=True, cwd=REPO)
    md = (tmp_path / "s.md").read_text()
    verdicts = [line for line in md.splitlines() if line.startswith("- **")]
    assert len(verdicts) == 9
    by_method = {v.split("**")[1]: v for v in verdicts}
    assert "within noise of float32" in by_method["mlc q0f32"]
    assert "measurably worse than float32" in by_method["mlc q3f16_1"]
    assert "worse than gguf Q4_0 (numpy)" in by_method["mlc q3f16_1"]  # paired over the same chunks
    assert "unigram baseline" in md and "| float32 reference | 参照の答え |" in md and "| mlc q4f16_0 | q4f16_0 の答え |" in md
    header = (tmp_path / "s.csv").read_text().splitlines()[0]
    assert "delta_ppl_ci_low" in header and "kl_mean_ci_high" in header


# ---------------------------------------------------------------- the workflow


def test_manpages_config_plans_corpus_training_and_reports(tmp_path):
    from conftest import copy_workflow, run_snakemake

    wf = copy_workflow(tmp_path)
    out = run_snakemake(wf, "-n", "reports", "--configfile", "config/manpages.yaml").stdout
    for rule in ("fetch_corpus", "prepare_corpus", "train_model", "fetch_model", "tokenizer", "unigram_baseline", "summarize"):
        assert f"rule {rule}:" in out or f"localrule {rule}:" in out, rule
    assert "--unigram-train resources/corpus/manpages-ja/train.txt" in out
    assert "generate_tiny_model" not in out
    (wf / "nope.yaml").write_text("models: {neox-ja-manpages: {train: {corpus: nope}}}\n")
    bad = run_snakemake(wf, "-n", "--configfile", "config/manpages.yaml", "nope.yaml", check=False)
    assert bad.returncode != 0 and "trains on unknown corpus 'nope'; corpora: manpages-ja" in bad.stdout + bad.stderr


def test_gguf_peer_of_a_tied_checkpoint_keeps_the_head_tied(trained):
    """LINE ties its output head to the embedding; the gguf peer must load such a checkpoint (it failed before)."""
    from neox_mlc.evaluate import gguf_dequantized_state
    from neox_mlc.reference import load_hf_model

    state, _, _ = gguf_dequantized_state(trained / "a", "Q8_0")
    model = load_hf_model(trained / "a", state)
    assert model.lm_head.weight.data_ptr() == model.gpt_neox.embed_in.weight.data_ptr()
    assert np.array_equal(model.gpt_neox.embed_in.weight.detach().numpy(), state["gpt_neox.embed_in.weight"])


def test_gguf_peer_answers_the_template_prompts(trained, tmp_path):
    """gguf rows carry greedy answers side by side too, formatted with the config's template as gen_config expands it."""
    import yaml

    from neox_mlc.evaluate import evaluate_gguf
    from neox_mlc.make_tokenizer import make_tokenizer

    make_tokenizer(trained / "a", tmp_path / "tok")
    template = yaml.safe_load((REPO / "config.yaml").read_text())["conv_templates"]["line_llm"]
    text = (trained / "train.txt").read_text()
    q = evaluate_gguf(trained / "a", tmp_path / "tok" / "tokenizer.json", "Q8_0", text, 32, 256, template, ["表示します"], answer_tokens=4)
    assert [a["prompt"] for a in q["answers"]] == ["表示します"] and all(isinstance(a["bundle"], str) for a in q["answers"])
    assert q["scored_tokens"] == sum(q["chunks"]["tokens"]) and q["delta_ppl_ci95"][0] <= q["delta_ppl"] <= q["delta_ppl_ci95"][1]


@pytest.mark.skipif(llama_python() is None, reason="optional llama-cpp-python interpreter (LLAMA_PYTHON) not installed")
def test_llama_cpp_row_is_scored_on_the_report_chunks_and_answers(trained, tmp_path):
    """llama.cpp's own row (#15) on a tied, sequential-residual model: the report's windows, its reference, greedy answers."""
    import yaml
    from tokenizers import Tokenizer

    from neox_mlc.evaluate import chunk_sizes, eval_windows, text_ids, token_nll
    from neox_mlc.llamacpp import evaluate_llama_cpp
    from neox_mlc.make_tokenizer import make_tokenizer
    from neox_mlc.reference import hf_logits, load_hf_model

    make_tokenizer(trained / "a", tmp_path / "tok")
    tok_path = tmp_path / "tok" / "tokenizer.json"
    template = yaml.safe_load((REPO / "config.yaml").read_text())["conv_templates"]["line_llm"]
    text = (trained / "train.txt").read_text()
    q = evaluate_llama_cpp(trained / "a", tok_path, "F16", text, 32, 256, template, ["表示します", "日本の首都は"], answer_tokens=6)
    windows = eval_windows(text_ids(Tokenizer.from_file(str(tok_path)), text), 32, 256)
    assert q["chunks"]["tokens"] == chunk_sizes(windows)  # the same chunks as every other row: pairwise verdicts hold
    ref = load_hf_model(trained / "a")
    first = token_nll(hf_logits(ref, windows[0])[:-1], np.asarray(windows[0][1:])).sum()
    assert q["chunks"]["nll_reference"][0] == pytest.approx(first, rel=1e-6)  # scored against the float32 reference
    # 1 layer: 4 matrices, the embedding and the tied head written again as output.weight; norms and biases float32
    assert q["method"] == "llama.cpp F16" and q["tensor_types"] == {"F16": 6, "F32": 10} and q["kl_mean"] < 1e-5
    # greedy through llama.cpp's own last-token logits: F16 answers what float32 answers
    assert [a["bundle"] for a in q["answers"]] == [a["reference"] for a in q["answers"]] and any(a["bundle"] for a in q["answers"])
