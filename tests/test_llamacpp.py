"""llama.cpp as a peer (neox_mlc/llamacpp.py): the GGUF this project writes, and llama.cpp's own logits."""

import json

import numpy as np
import pytest

from neox_mlc.llamacpp import _regroup_qkv, llama_python, write_gguf


def test_qkv_rows_regrouped_from_per_head_to_per_kind():
    heads, hd, k = 3, 2, 5
    w = np.arange(heads * 3 * hd * k).reshape(heads * 3 * hd, k)  # rows: head0 q q k k v v, head1 ...
    out = _regroup_qkv(w, heads)
    per_head = w.reshape(heads, 3, hd, k)
    assert np.array_equal(out[: heads * hd], per_head[:, 0].reshape(-1, k))  # all q first
    assert np.array_equal(out[2 * heads * hd :], per_head[:, 2].reshape(-1, k))  # all v last
    assert np.array_equal(_regroup_qkv(np.arange(18), 3)[:6], [0, 1, 6, 7, 12, 13])  # the bias the same way


def test_gguf_has_llama_cpp_names_hyperparameters_and_float16_matrices(fixtures_dir, tmp_path):
    import gguf

    model = fixtures_dir / "model"
    cfg = json.loads((model / "config.json").read_text())
    path = write_gguf(model, tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in r.tensors}
    layers = cfg["num_hidden_layers"]
    assert len(tensors) == 4 + 12 * layers
    assert tensors["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(tensors["token_embd.weight"].shape) == [cfg["hidden_size"], cfg["vocab_size"]]

    def field(key):
        f = r.fields[key]
        return f.parts[f.data[0]].tolist()[0] if f.types[0] != gguf.GGUFValueType.STRING else bytes(f.parts[f.data[0]]).decode()

    assert field("general.architecture") == "gptneox"
    assert field("gptneox.block_count") == layers
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert field("gptneox.rope.dimension_count") == int(cfg.get("rotary_pct", 1.0) * head_dim)
    assert field("tokenizer.ggml.model") == "none"


needs_llama = pytest.mark.skipif(llama_python() is None, reason="optional llama-cpp-python interpreter (LLAMA_PYTHON) not installed")

# llama.cpp's F16 run against transformers float32 (max |logit difference|): float16 weights,
# activations rounded to float16 in its matmuls, a float16 KV cache. Measured: 2.4e-4 (fixture),
# 2.8e-4 (tied-sequential variant), 3.9e-3 (the manpages evaluation model); QKV left per head: 0.36.
F16_LOGIT_TOL = 0.005


def _tied_sequential_variant(fixtures_dir, dest):
    """The fixture with LINE's choices instead: tied head (no embed_out), sequential residual, full rotary."""
    from safetensors.numpy import load_file, save_file

    dest.mkdir()
    cfg = json.loads((fixtures_dir / "model" / "config.json").read_text())
    cfg.update(tie_word_embeddings=True, use_parallel_residual=False, rotary_pct=1.0)
    (dest / "config.json").write_text(json.dumps(cfg))
    state = {k: v for k, v in load_file(fixtures_dir / "model" / "model.safetensors").items() if k != "embed_out.weight"}
    save_file(state, dest / "model.safetensors")
    return dest


def _llama_vs_transformers(model, tmp_path):
    """llama.cpp's logits of two different windows in one run, and transformers' of each."""
    import subprocess

    from neox_mlc.llamacpp import _REPO
    from neox_mlc.reference import hf_logits, load_hf_model

    windows = [list(range(3, 40)), [7, 500, 12, 900, 44, 3, 1000, 250, 31, 5]]
    gg = write_gguf(model, tmp_path / "m.gguf")
    (tmp_path / "ids.json").write_text(json.dumps(windows))
    subprocess.run([llama_python(), "-m", "neox_mlc.llamacpp", "logits", str(gg), str(tmp_path / "ids.json"), str(tmp_path / "o.npy")],
                   check=True, cwd=_REPO, capture_output=True)  # fmt: skip
    ours = np.load(tmp_path / "o.npy")
    ref = load_hf_model(model)
    return ours, np.concatenate([hf_logits(ref, w) for w in windows])


@needs_llama
@pytest.mark.parametrize("variant", ["fixture", "tied-sequential"])
def test_llama_cpp_runs_our_f16_gguf_like_transformers(fixtures_dir, tmp_path, variant):
    """Tensor names, QKV regrouping, rotary dims, eps and residual kind are right if llama.cpp's F16 matches transformers."""
    model = fixtures_dir / "model" if variant == "fixture" else _tied_sequential_variant(fixtures_dir, tmp_path / "tied")
    ours, ref = _llama_vs_transformers(model, tmp_path)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < F16_LOGIT_TOL  # every window: each one's logits, not the last one's
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.95


@needs_llama
def test_the_f16_check_catches_a_wrong_gguf(fixtures_dir, tmp_path, monkeypatch):
    """The tolerance above is tight enough to catch a real writer bug: QKV rows left per head."""
    import neox_mlc.llamacpp as llamacpp

    monkeypatch.setattr(llamacpp, "_regroup_qkv", lambda w, heads: w)
    ours, ref = _llama_vs_transformers(fixtures_dir / "model", tmp_path)
    assert np.abs(ours - ref).max() > 10 * F16_LOGIT_TOL


def test_unknown_llama_cpp_type_is_one_line_naming_the_allowed(tmp_path):
    import yaml

    from neox_mlc.common import WorkflowError
    from neox_mlc.workflow_config import check_config

    from conftest import REPO

    cfg = yaml.safe_load((REPO / "config.yaml").read_text()) | {"llama_cpp_types": ["Q4_0", "Q5_K"]}
    with pytest.raises(WorkflowError, match=r"^unknown llama_cpp_types entry 'Q5_K' in config; allowed: F16, Q8_0, Q4_0$"):
        check_config(cfg, REPO)
