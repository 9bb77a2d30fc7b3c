"""Quality metrics on known answers, and the tiny model's report ranks the modes sensibly."""

import csv
import json

import numpy as np
import pytest

from neox_mlc.evaluate import compare, eval_windows, kl_divergence, perplexity, token_nll, top1_agreement

from conftest import copy_workflow, run_snakemake

ALL = ["q0f32", "q0f16", "q4f16_0", "q4f16_1", "q4f32_1", "q3f16_1"]


def test_kl_of_identical_distributions_is_zero():
    logits = np.random.default_rng(0).standard_normal((50, 300))
    assert np.allclose(kl_divergence(logits, logits), 0.0, atol=1e-12)
    assert (kl_divergence(logits, logits + 1.0) < 1e-12).all()  # a shift does not change a softmax


def test_kl_known_value():
    p = np.log(np.array([[0.5, 0.5]]))
    q = np.log(np.array([[0.25, 0.75]]))
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    assert kl_divergence(p, q)[0] == pytest.approx(expected, rel=1e-12)


def test_uniform_model_perplexity_is_vocabulary_size():
    vocab = 1024
    targets = np.random.default_rng(1).integers(0, vocab, 200)
    assert perplexity(token_nll(np.zeros((200, vocab)), targets)) == pytest.approx(vocab, rel=1e-12)


def test_agreement_of_identical_runs_is_100_percent_and_compare_is_neutral():
    logits = np.random.default_rng(2).standard_normal((40, 64))
    targets = np.random.default_rng(3).integers(0, 64, 40)
    assert top1_agreement(logits, logits) == 100.0
    m = compare(logits, logits, targets)
    assert m["delta_ppl"] == 0 and m["ppl_ratio"] == 1 and m["kl_mean"] == 0 and m["top1_agreement_pct"] == 100


def test_windows_cover_the_text_once():
    ids = list(range(10))
    assert eval_windows(ids, 4, 100) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert eval_windows(ids, 4, 6) == [[0, 1, 2, 3], [4, 5]]


@pytest.fixture(scope="module")
def tiny_reports(tmp_path_factory):
    wf = copy_workflow(tmp_path_factory.mktemp("reports-wf"))
    run_snakemake(wf, "reports", "--configfile", "config/tiny.yaml", "--config", f"quantizations=[{','.join(ALL)}]", "target=llvm", "extra_targets=[]")
    return wf / "reports" / "tiny-neox-ja"


def test_report_ranks_q0f16_closest_and_q3f16_1_farthest(tiny_reports):
    with open(tiny_reports / "summary.csv") as handle:
        rows = {r["quantization"]: r for r in csv.DictReader(handle)}
    assert set(rows) == set(ALL) | {"Q4_0", "Q4_1", "Q8_0"}
    kl = {q: float(rows[q]["kl_mean"]) for q in ALL}
    low_bit = ["q4f16_0", "q4f16_1", "q4f32_1", "q3f16_1"]
    assert min(kl, key=kl.get) in ("q0f32", "q0f16") and kl["q0f16"] < min(kl[q] for q in low_bit)
    assert max(kl, key=kl.get) == "q3f16_1"
    assert float(rows["q0f16"]["top1_agreement_pct"]) >= float(rows["q3f16_1"]["top1_agreement_pct"])
    assert (tiny_reports / "quality_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_json_has_every_field(tiny_reports):
    q = json.loads((tiny_reports / "q4f16_1" / "quality.json").read_text())
    for key in ("ppl", "ppl_reference", "delta_ppl", "ppl_ratio", "kl_mean", "kl_p99", "top1_agreement_pct", "bits_per_param", "params_bytes_on_disk", "peak_rss_gib"):
        assert isinstance(q[key], (int, float)), key
    assert q["speed_host_cpu"]["prefill_tok_s"] > 0 and q["speed_host_cpu"]["decode_tok_s"] > 0
    assert q["answers"] and all(a["bundle"] is not None and a["reference"] for a in q["answers"])
    assert q["ppl_ratio"] == pytest.approx(q["ppl"] / q["ppl_reference"])
