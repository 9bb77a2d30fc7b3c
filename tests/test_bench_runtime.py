"""How the runtime benchmark orders its runs and judges the llama.cpp targets (neox_mlc.bench_runtime)."""

from neox_mlc.bench_runtime import PEERS, _targets, paired_ratios, round_order

ENGINES = ["mlc_q0f16", "mlc_q4f16_0", "mlc_q4f16_1", "torch_eager_float32", "llama_cpp_F16", "llama_cpp_Q8_0", "llama_cpp_Q4_0"]


def test_each_mode_runs_beside_its_peer_and_odd_rounds_reverse():
    first = round_order(ENGINES, 0)
    assert first == ["mlc_q0f16", "llama_cpp_F16", "mlc_q4f16_0", "llama_cpp_Q4_0", "mlc_q4f16_1", "torch_eager_float32", "llama_cpp_Q8_0"]
    for mode, peer in PEERS.items():
        assert abs(first.index(mode) - first.index(peer)) == 1
    assert round_order(ENGINES, 1) == first[::-1] and round_order(ENGINES, 2) == first
    assert round_order(ENGINES[:3], 0) == ENGINES[:3]  # no llama.cpp: the modes as given


def test_targets_follow_the_paired_ratios_not_the_medians():
    """Rounds where the host slowed down for both engines: medians say 'slower', every pair says 'faster'."""
    ours = [{"decode_tok_s": d, "prefill_tok_s": 100.0} for d in (170.0, 126.0, 127.0)]
    peer = [{"decode_tok_s": d, "prefill_tok_s": 150.0} for d in (165.0, 120.0, 180.0)]
    runs = {"mlc_q0f16": ours, "llama_cpp_F16": peer}
    paired = {w: paired_ratios(runs, "mlc_q0f16", "llama_cpp_F16", f"{w}_tok_s") for w in ("decode", "prefill")}
    assert paired["decode"]["per_round"] == [1.0303, 1.05, 0.7056] and paired["decode"]["median"] == 1.0303
    out = {f"mlc_{q}": {"vs_" + PEERS[f"mlc_{q}"]: paired} for q in ("q0f16", "q4f16_0", "q4f16_1")}
    targets = _targets(out, llama=True, torch_too=False)
    assert targets["decode_q0f16_at_least_llama_cpp"] and targets["prefill_q0f16_at_least_half_llama_cpp"]
    paired["prefill"] = paired_ratios({"a": ours, "b": [{"prefill_tok_s": 201.0}] * 3}, "a", "b", "prefill_tok_s")
    assert not _targets(out, llama=True, torch_too=False)["prefill_q0f16_at_least_half_llama_cpp"]
