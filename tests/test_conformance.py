"""Conformance with MLC-LLM itself, against the files MLC-LLM commit 79d603f wrote (shared fixtures).

* converter: byte-identical shards and identical tensor-cache records and metadata, every mode;
* gen_config: JSON-equal chat config, every mode (with ``eos_stop=False``; the default adds eos to the stop ids);
* compile: the library exports MLC's function names with the same parameter names and a metadata
  function with the same keys; prefill/decode logits within 5e-3 max abs of MLC's and identical
  greedy tokens (q0f16, q4f16_1: the modes the fixtures hold logits for). Observed: ≤ 1.5e-3.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from neox_mlc.gen_config import load_templates, make_chat_config

from conftest import ALL_QUANTS, FIXTURES, SHARED_FIXTURES

LOGIT_TOL = 5e-3  # the fixture README's bound; MLC's own q0f16 differs from float32 numpy by 1.4e-3


def interface_of(chat_config_path: Path, device: str = "llvm") -> dict:
    """Relax functions and their parameter names, as ``lib-interface.json`` lists them."""
    from tvm import relax

    from neox_mlc.compile import _attach_metadata, export_module, metadata

    mod, params, _, cfg = export_module(chat_config_path, device)
    mod = _attach_metadata(mod, metadata(cfg, params, {}))
    funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, relax.Function)}
    return {
        "vm_functions": sorted(funcs),
        "vm_function_params": {name: [str(p.name) for p in funcs[name].params] for name in sorted(funcs)},
    }


@pytest.mark.parametrize("quant", ALL_QUANTS)
def test_converter_matches_mlc_byte_for_byte(quant, fixtures_dir, converted):
    ours, ref = converted(quant), fixtures_dir / quant
    ref_index = json.loads((ref / "tensor-cache.json").read_text())
    our_index = json.loads((ours / "tensor-cache.json").read_text())
    assert our_index["records"] == ref_index["records"]  # names, shapes, dtypes, formats, offsets, md5
    for key, value in ref_index["metadata"].items():
        assert our_index["metadata"][key] == pytest.approx(value, abs=1e-9)
    for shard in ref_index["records"]:
        assert (ours / shard["dataPath"]).read_bytes() == (ref / shard["dataPath"]).read_bytes()
    assert json.loads((ours / "tensor-cache-b16.json").read_text()) == json.loads((ref / "tensor-cache-b16.json").read_text())


@pytest.mark.parametrize("quant", ALL_QUANTS)
def test_gen_config_matches_mlc(quant, fixtures_dir):
    template = load_templates()["line_llm"]
    ours = make_chat_config(fixtures_dir / "model", quant, "line_llm", template, 768, eos_stop=False)
    ref = json.loads((fixtures_dir / quant / "mlc-chat-config.json").read_text())
    assert ours == ref  # no field legitimately differs: MLC's chat config carries no tool version
    # the workflow's default adds the checkpoint's eos id to the stop ids, and changes nothing else
    default = make_chat_config(fixtures_dir / "model", quant, "line_llm", template, 768)
    ref["conv_template"]["stop_token_ids"] = ref["conv_template"]["stop_token_ids"] + [ref["eos_token_id"]]
    assert default == ref


@pytest.fixture(scope="module", params=["q0f16", "q4f16_1"])
def mlc_lib(request, fixtures_dir, converted, compiled):
    quant = request.param
    cfg = fixtures_dir / quant / "mlc-chat-config.json"
    return quant, compiled(cfg), converted(quant), cfg


def test_library_interface_matches_mlc(mlc_lib, fixtures_dir):
    import tvm
    from tvm import relax

    quant, lib, params, cfg = mlc_lib
    ref = json.loads((fixtures_dir / quant / "lib-interface.json").read_text())
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    exe = vm.module
    for name in ref["vm_functions"]:
        assert vm[name] is not None, name
    from neox_mlc.compile import build  # noqa: F401  (the module that wrote the library)

    meta = json.loads(str(vm["_metadata"]()))
    assert set(meta) == set(ref["metadata"])
    assert [p["name"] for p in meta["params"]] == [p["name"] for p in ref["metadata"]["params"]]
    assert [p["dtype"] for p in meta["params"]] == [p["dtype"] for p in ref["metadata"]["params"]]
    for key in ("model_type", "quantization", "context_window_size", "prefill_chunk_size", "kv_cache", "active_vocab_size"):
        assert meta[key] == ref["metadata"][key], key
    del exe


def test_library_function_params_match_mlc(mlc_lib, fixtures_dir):
    """Parameter names per function, read from the Relax module the library was built from."""

    quant, _lib, _params, cfg = mlc_lib
    ref = json.loads((fixtures_dir / quant / "lib-interface.json").read_text())
    ours = interface_of(cfg, "llvm")
    assert ours["vm_functions"] == ref["vm_functions"]
    assert ours["vm_function_params"] == ref["vm_function_params"]


def test_logits_and_greedy_tokens_match_mlc(mlc_lib, fixtures_dir):
    from neox_mlc.runtime import ModelRuntime

    quant, lib, params, cfg = mlc_lib
    ids = json.loads((fixtures_dir / "inputs.json").read_text())["input_ids"]
    greedy = json.loads((fixtures_dir / quant / f"greedy_{quant}.json").read_text())
    ref_prefill = np.load(fixtures_dir / quant / f"prefill_logits_{quant}.npy").reshape(-1)
    ref_decode = np.load(fixtures_dir / quant / f"decode_logits_{quant}.npy")
    rt = ModelRuntime(lib, params, cfg)
    logits = rt.prefill(ids)
    assert np.abs(logits - ref_prefill).max() < LOGIT_TOL
    tokens = [int(logits.argmax())]
    for i, row in enumerate(ref_decode):
        logits = rt.decode(tokens[-1])
        assert np.abs(logits - row).max() < LOGIT_TOL, f"decode step {i}"
        tokens.append(int(logits.argmax()))
    assert tokens[:-1] == greedy["greedy_tokens"]
    assert tokens[-1] == greedy["next_token_after_greedy"]


def test_fixture_copy_matches_the_shared_original():
    """The repository's copy must not drift from the team's fixtures (where a checkout has them)."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"no shared fixtures at {SHARED_FIXTURES} to compare the repository's copy with")
    ours = {p.relative_to(FIXTURES): p.read_bytes() for p in FIXTURES.rglob("*") if p.is_file()}
    theirs = {p.relative_to(SHARED_FIXTURES): p.read_bytes() for p in SHARED_FIXTURES.rglob("*") if p.is_file()}
    assert ours.keys() == theirs.keys() and all(ours[k] == theirs[k] for k in ours)
