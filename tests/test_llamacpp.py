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


@pytest.mark.skipif(llama_python() is None, reason="optional llama-cpp-python interpreter (LLAMA_PYTHON) not installed")
def test_llama_cpp_runs_our_f16_gguf_like_transformers(fixtures_dir, tmp_path):
    import subprocess

    from neox_mlc.llamacpp import _REPO
    from neox_mlc.reference import hf_logits, load_hf_model

    model = fixtures_dir / "model"
    ids = list(range(3, 40))
    gg = write_gguf(model, tmp_path / "m.gguf")
    (tmp_path / "ids.json").write_text(json.dumps([ids]))
    subprocess.run([llama_python(), "-m", "neox_mlc.llamacpp", "logits", str(gg), str(tmp_path / "ids.json"), str(tmp_path / "o.npy")],
                   check=True, cwd=_REPO)
    ours = np.load(tmp_path / "o.npy")
    ref = hf_logits(load_hf_model(model), ids)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 0.05  # F16 weights, llama.cpp's float16 KV cache
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.95
