"""Quantization registry: known answers per mode and round-trip bounds (hypothesis)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from neox_mlc.common import WorkflowError
from neox_mlc.quantization import QUANTIZATIONS, dequantize, get_quantization, quantize

GROUP_MODES = [q for q in QUANTIZATIONS.values() if q.kind == "group-quant"]


def test_registry_lists_the_six_mlc_modes():
    assert list(QUANTIZATIONS) == ["q0f32", "q0f16", "q4f16_0", "q4f16_1", "q4f32_1", "q3f16_1"]
    q3 = QUANTIZATIONS["q3f16_1"]
    assert (q3.bits, q3.group_size, q3.elems_per_word, q3.max_int) == (3, 40, 10, 3)
    q4 = QUANTIZATIONS["q4f16_1"]
    assert (q4.bits, q4.group_size, q4.elems_per_word, q4.max_int) == (4, 32, 8, 7)


def test_unknown_quantization_names_allowed_values():
    with pytest.raises(WorkflowError, match=r"unknown quantization 'q5f16'.*q0f32, q0f16, q4f16_0"):
        get_quantization("q5f16")


def test_4bit_known_answer_hand_checked():
    # One group of 32: w = k * 0.125 for k = -7..7 repeated; max|w| = 0.875 -> scale 0.125 exactly.
    q = QUANTIZATIONS["q4f16_1"]
    ks = np.array(list(range(-7, 8)) * 3)[:32]
    w = (ks * 0.125).astype(np.float16).reshape(1, 32)
    q_weight, q_scale = quantize(w, q)
    assert q_scale.dtype == np.float16 and q_scale.shape == (1, 1)
    assert q_scale[0, 0] == 0.125
    codes = ks + 7  # zero point 7
    expected = [sum(int(codes[8 * word + j]) << (4 * j) for j in range(8)) for word in range(4)]
    assert q_weight.dtype == np.uint32 and q_weight.tolist() == [expected]


def test_3bit_pads_partial_group_with_code_zero():
    # K = 64 with groups of 40: 2 groups, 8 words; positions 64..79 are padding and hold code 0.
    q = QUANTIZATIONS["q3f16_1"]
    w = np.full((2, 64), 0.3, dtype=np.float16)
    q_weight, q_scale = quantize(w, q)
    assert q_weight.shape == (2, 8) and q_scale.shape == (2, 2)
    codes = ((q_weight[:, :, None] >> (np.arange(10, dtype=np.uint32) * 3)) & 7).reshape(2, 80)
    assert (codes[:, :64] == 6).all()  # round(0.3 / 0.1) + 3
    assert (codes[:, 64:] == 0).all()


def test_offset_is_added_before_rounding_in_float16():
    # 1.501 + 7 rounds to 8.5 in float16, then half-to-even gives 8 (MLC's result), not 9.
    q = QUANTIZATIONS["q4f16_1"]
    w = np.zeros((1, 32), dtype=np.float16)
    w[0, 0] = np.float16(0.03952)
    scale = np.float16(np.float16(0.03952) / np.float16(7))
    w[0, 1] = np.float16(scale * np.float16(1.501))
    q_weight, _ = quantize(w, q)
    code1 = (int(q_weight[0, 0]) >> 4) & 15
    assert np.float16(np.float16(w[0, 1] / scale) + np.float16(7)) == np.float16(8.5)
    assert code1 == 8


def test_zero_group_quantizes_to_zero_point():
    q = QUANTIZATIONS["q4f32_1"]
    q_weight, q_scale = quantize(np.zeros((1, 32), np.float32), q)
    assert q_scale[0, 0] == 0
    assert dequantize(q_weight, q_scale, q, 32).tolist() == [[0.0] * 32]


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(GROUP_MODES),
    rows=st.integers(1, 4),
    k=st.integers(1, 100),
    data=st.data(),
)
def test_roundtrip_within_half_a_step(mode, rows, k, data):
    """|dequantize(quantize(w)) - w| <= scale/2 (+ float16 rounding of quotient and product).

    One exception, MLC's too: a group whose max|w|/max_int underflows float16's subnormal range gets
    a scale of (about) 0, so its error is bounded by max_int × the smallest subnormal instead.
    """
    dtype = np.dtype(mode.model_dtype)
    w = data.draw(arrays(dtype, (rows, k), elements=st.floats(-8, 8, width=16)))
    q_weight, q_scale = quantize(w, mode)
    back = dequantize(q_weight, q_scale, mode, k)
    scale = np.repeat(q_scale.astype(np.float32), mode.group_size, axis=1)[:, :k]
    # half a quantization step, plus float16 rounding of the quotient and the product
    underflow = mode.max_int * 2.0**-24 if dtype == np.float16 else 0.0
    slack = 0.5 * scale + np.abs(w.astype(np.float32)) * (2e-3 if dtype == np.float16 else 1e-6) + 1e-7 + underflow
    assert (np.abs(back - w.astype(np.float32)) <= slack + 0.5 * scale * 0.01).all()


@settings(max_examples=40, deadline=None)
@given(arrays(np.float16, st.tuples(st.integers(1, 5), st.integers(1, 40)), elements=st.floats(-6e4, 6e4, width=16)))
def test_q0f32_conversion_is_exact_before_storage(w):
    """q0f32 does not quantize: the converter's cast of a float16 checkpoint to float32 is exact.

    The tensor cache then stores float32 as bfloat16 (MLC's ``f32-to-bf16``): that rounding is the
    format's, bounded by half a bfloat16 ulp, and checked separately below.
    """
    out = w.astype(QUANTIZATIONS["q0f32"].model_dtype)
    assert out.dtype == np.float32 and np.array_equal(out.astype(np.float16), w)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.integers(1, 64), elements=st.floats(-2.0**100, 2.0**100, width=32, allow_subnormal=False)))
def test_bf16_storage_within_half_ulp(w):
    from neox_mlc.tensor_cache import bf16_to_f32, f32_to_bf16

    back = bf16_to_f32(f32_to_bf16(w))
    assert (np.abs(back - w) <= np.abs(w) * 2.0**-8).all()


@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from(GROUP_MODES), rows=st.integers(1, 6), groups=st.integers(1, 6), short=st.integers(0, 9), data=st.data())
def test_fast_path_is_bit_identical_to_the_numpy_specification(mode, rows, groups, short, data):
    from neox_mlc.quantization import quantize_fast

    k = groups * mode.group_size - short  # short > 0: a trailing partial group, zero-padded
    w = data.draw(arrays(np.dtype(mode.model_dtype), (rows, k), elements=st.floats(-4, 4, width=16)))
    if data.draw(st.booleans()):
        w[0, : mode.group_size] = 0  # an all-zero group
    before = w.copy()
    a, b = quantize(w, mode), quantize_fast(w, mode)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.array_equal(w, before)  # the source tensor is read, never written
