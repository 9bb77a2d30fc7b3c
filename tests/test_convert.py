"""Converter behaviour beyond conformance: TVM reads the cache back, bad input, atomicity, .bin."""

import json
import shutil
import subprocess
import sys

import pytest

from neox_mlc.common import WorkflowError
from neox_mlc.convert_weight import build_plan, convert, convert_shard
from neox_mlc.tensor_cache import plan_shards

from conftest import REPO


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_tvm_loader_reads_every_tensor_as_the_chat_config_expects(tiny_model, tmp_path):
    import tvm
    from tvm.contrib import tvmjs

    from neox_mlc.compile import export_module
    from neox_mlc.gen_config import load_templates, make_chat_config

    out = tmp_path / "params"
    convert(tiny_model, "q4f16_1", out)
    cfg = make_chat_config(tiny_model, "q4f16_1", "line_llm", load_templates()["line_llm"], 256)
    (tmp_path / "mlc-chat-config.json").write_text(json.dumps(cfg))
    _, params, _, _ = export_module(tmp_path / "mlc-chat-config.json", "llvm")
    loaded, meta = tvmjs.load_tensor_cache(str(out), tvm.cpu())
    assert meta["ParamSize"] == len(params) == len(loaded)
    for name, param in params:
        assert list(loaded[name].shape) == [int(d) for d in param.shape], name
        assert str(loaded[name].dtype) == param.dtype, name


def test_cli_one_line_error_for_unknown_quantization(fixtures_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/convert_weight.py"), str(fixtures_dir / "model"), "--quantization", "q5f16", "-o", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown quantization 'q5f16'; allowed: q0f32, q0f16, q4f16_0, q4f16_1, q4f32_1, q3f16_1"]
    assert not (tmp_path / "o").exists()


def test_non_neox_architecture_is_refused(fixtures_dir, tmp_path):
    model = _copy_model(fixtures_dir / "model", tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WorkflowError, match=r"architectures \['LlamaForCausalLM'\].*supported: GPTNeoXForCausalLM"):
        build_plan(model, "q4f16_1")


def test_truncated_weight_file_names_file_and_tensor(fixtures_dir, tmp_path):
    model = _copy_model(fixtures_dir / "model", tmp_path / "m")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WorkflowError, match=r"model.safetensors is truncated: tensor gpt_neox\.\S+ needs bytes"):
        build_plan(model, "q0f16")


def test_missing_weight_file_is_named(fixtures_dir, tmp_path):
    model = _copy_model(fixtures_dir / "model", tmp_path / "m")
    (model / "model.safetensors").unlink()
    with pytest.raises(WorkflowError, match=r"no weight files .* in .*m$"):
        build_plan(model, "q0f16")


def test_missing_tensor_is_named(fixtures_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    model = _copy_model(fixtures_dir / "model", tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    del tensors["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(WorkflowError, match=r"missing tensor gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.weight"):
        build_plan(model, "q4f16_1")


def test_interrupted_conversion_leaves_no_output(fixtures_dir, tmp_path, monkeypatch):
    import neox_mlc.convert_weight as cw

    calls = {"n": 0}
    real = cw.encode_shard

    def dying(*args, **kwargs):
        calls["n"] += 1
        raise KeyboardInterrupt  # as if killed while writing the first shard

    monkeypatch.setattr(cw, "encode_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        cw.convert(fixtures_dir / "model", "q0f16", tmp_path / "params")
    assert calls["n"] == 1
    assert not (tmp_path / "params").exists()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(cw, "encode_shard", real)


def test_index_refuses_short_shard(fixtures_dir, tmp_path):
    plan = build_plan(fixtures_dir / "model", "q0f16")
    out = tmp_path / "params"
    out.mkdir()
    convert_shard(plan, 0, out)
    path = out / "params_shard_0.bin"
    path.write_bytes(path.read_bytes()[:-10])
    from neox_mlc.convert_weight import write_plan_index

    with pytest.raises(WorkflowError, match=r"params_shard_0.bin has \d+ bytes, expected \d+"):
        write_plan_index(plan, out)
    assert not (out / "tensor-cache.json").exists()


def test_sharding_follows_tvm_rule():
    mb = 1 << 20
    entries = [("a", [6 * mb], "int8"), ("b", [12 * mb], "int8"), ("c", [20 * mb], "int8"), ("d", [1], "int8")]
    shards = plan_shards(entries, shard_cap_mb=32)
    # c (>= half the cap) does not fit beside a+b and goes out-of-band first; d continues a+b's shard.
    assert [[r["name"] for r in s.records] for s in shards] == [["c"], ["a", "b", "d"]]
    assert [s.data_path for s in shards] == ["params_shard_0.bin", "params_shard_1.bin"]


@pytest.mark.parametrize("quant", ["q4f16_0", "q4f16_1", "q3f16_1"])
def test_each_record_converts_alike_whatever_came_before(fixtures_dir, quant):
    """A convert_shard job starts a fresh converter at its shard's first record, which may be a
    ``q_scale`` whose ``q_weight`` sits in the previous shard (on a 3.6 B model, most pairs around a
    shard boundary). Each record, converted first by a fresh converter, must still be MLC's bytes."""
    import numpy as np

    from neox_mlc.convert_weight import _Converter
    from neox_mlc.hf_checkpoint import TensorIndex
    from neox_mlc.tensor_cache import encode

    plan = build_plan(fixtures_dir / "model", quant)
    index = TensorIndex(fixtures_dir / "model")
    reference = (fixtures_dir / quant / "params_shard_0.bin").read_bytes()
    records = [r for s in plan["shards"] for r in s["records"]]
    assert any(r["name"].endswith("embed_in.q_scale") for r in records)
    for rec in records:
        fresh = bytes(encode(np.ascontiguousarray(_Converter(plan, index).tensor(rec["name"]))))
        assert fresh == reference[rec["byteOffset"] : rec["byteOffset"] + rec["nbytes"]], rec["name"]


def test_pytorch_bin_checkpoint_converts_identically(fixtures_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "bin"
    model.mkdir()
    shutil.copy2(fixtures_dir / "model" / "config.json", model / "config.json")
    torch.save(load_file(fixtures_dir / "model" / "model.safetensors"), model / "pytorch_model.bin")
    convert(model, "q4f16_1", tmp_path / "out")
    ref = fixtures_dir / "q4f16_1"
    assert (tmp_path / "out" / "params_shard_0.bin").read_bytes() == (ref / "params_shard_0.bin").read_bytes()


def test_malicious_pickle_is_refused_and_never_executed(fixtures_dir, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    model = tmp_path / "evil"
    model.mkdir()
    shutil.copy2(fixtures_dir / "model" / "config.json", model / "config.json")
    with open(model / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"gpt_neox.embed_in.weight": Evil()}, handle)
    with pytest.raises(WorkflowError, match=r"refusing to load .*pytorch_model.bin: torch.load\(weights_only=True\) failed"):
        build_plan(model, "q0f16")
    assert not marker.exists()


@pytest.mark.parametrize("quant", ["q0f16", "q4f16_1"])
def test_tensor_shapes_must_be_what_config_json_implies(fixtures_dir, tmp_path, quant):
    """The plan is derived from the parameters the model library declares for config.json, so a
    checkpoint whose tensors disagree with its config stops before any output (it used to convert
    into a bundle whose library failed at run time)."""
    model = tmp_path / "model"
    shutil.copytree(fixtures_dir / "model", model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WorkflowError, match=r"^tensor gpt_neox\.layers\.0\.mlp\.dense_4h_to_h\.weight has shape \[\d+, \d+\], but config\.json implies \[\d+, \d+\]$"):
        build_plan(model, quant)
