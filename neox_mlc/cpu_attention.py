"""Parallel, vectorised attention kernels for the host (``llvm``) library's paged KV cache.

Why: TVM 0.26's ``TIRPagedKVCache`` gives an llvm target scalar, single-threaded kernels
(``_attention_decode_cpu`` and the two prefill ones): one head after another on one core, and an
online softmax that rescales the whole output row after every KV row (two ``exp2`` per row). On a
decode step of the 162.5 M GPT-NeoX that was 2.0 of 15.8 CPU ms, with the second core idle, and
28 % of a 128-token prefill.

The kernels here have the same global symbols, signatures, buffer shapes and dtypes (the runtime
calls them by position) and compute the same attention; they differ in how the work is laid out:

* every (sequence, query head) pair — and, for prefill, every query row of it — is one parallel task;
* KV rows are taken a chunk (``page_size`` rows) at a time: all scores of the chunk, their maximum,
  one rescale of the output row per chunk, then the weighted values;
* loops over the head dimension run on 8-lane float32 vectors (the dot product keeps two vectors of
  partial sums), reading float16 K/V straight from the cache;
* the next chunk's K/V rows are prefetched while one is computed: in a decode step a layer's KV
  (430 KB at 162.5 M, context 140) comes from DRAM, since every layer's weights have streamed through
  the caches since it was last read; that, not arithmetic, is most of what is left (kernel alone, one
  thread: 22 µs with the KV in cache, 55 µs without; prefetching took 15 % off the latter). The
  prefetches go into L2 (``cpu_gemv.PREFETCH_LOCALITY``), as the weights' do: into L1 they waited on
  the core's few line-fill slots. 162.5 M q0f16 decode, two threads, the attention builtin over
  12 layers, A/B in one process: 0.51–0.54 → 0.47–0.51 ms a step at context 160, 2.14 → 1.71 ms at
  context 900 (prefill unchanged).

162.5 M q4f16_0, one thread, CPU ms (docs/benchmarks/runtime-profile-attention.json): decode step
11.4 → 10.5 (the attention builtin — RoPE, KV append, this kernel — 1.81 → 0.76 over 12 layers);
128-token prefill 485 → 377 (its attention 134 → 20).

Conventions kept from TVM: the softmax runs in the log2 domain (scores times ``sm_scale * log2(e)``),
starts from ``m = -5e4, d = 1`` and writes ``lse = m + log2(d)`` (so an empty KV gives O = 0,
lse = -5e4); ``rotary_mode == 1`` applies RoPE to Q and K inside the kernel with TVM's own ``_rope``
expression (rounded to the KV dtype as TVM does, K at position ``k_rope_pos_offset + column``); the
sliding-window variants read ``length_info[3, B]`` = (last page length, window start, sink length)
through TVM's own helpers; query head ``h`` reads KV head ``h // (H_qo // H_kv)``. Only the order of
float32 additions changes (≤ 1e-5 against TVM's kernels: tests/test_cpu_attention.py).

Prefill is causal by TVM's mask (``column < kv_len - qo_len + row + 1``) and skips masked columns
instead of scoring them ``-5e4``: identical whenever a row sees at least one column, which the runtime
guarantees (a sequence's KV holds its own queries); a row that sees none gets O = 0, lse = -5e4.
"""

from __future__ import annotations

import math
from typing import Any

import tvm
from tvm import tirx
from tvm.relax.frontend.nn.llm._kernel_common import _declare_length_info, _get_kv_chunk_len, _get_seq_offset, _rope
from tvm.script import tirx as T

from neox_mlc.cpu_gemv import CACHE_LINE, PREFETCH_LOCALITY

LOG2E = math.log2(math.exp(1))
M_INIT = -5e4  # TVM's initial running maximum
AHEAD = 1  # chunks located and prefetched ahead of the one computed (2 and 4 measured no faster)
RING = AHEAD + 1  # chunks of KV row numbers kept


def simd_lanes(head_dim: int) -> int:
    """float32 lanes of the vector loops: one AVX2 register where the head dimension allows."""
    return next(lanes for lanes in (8, 4, 2, 1) if head_dim % lanes == 0)


def acc_width(d_qk: int) -> int:
    """Partial sums of the q · k dot product: two SIMD vectors (two independent FMA chains) where
    the head dimension allows, so one row's reduction does not wait on each FMA's latency."""
    lanes = simd_lanes(d_qk)
    return 2 * lanes if d_qk % (2 * lanes) == 0 else lanes


def _softmax_macros(d_qk: int, d_v: int, qkv_dtype: str, rope_scaling: dict[str, Any]) -> tuple[Any, Any, Any, Any, Any]:
    """The TVMScript pieces every kernel here shares: (load_q, init, prefetch, chunk_update, store).

    A task's state lives in small per-task buffers (stack arrays in the generated code): ``q`` and
    ``o`` (float32 rows), ``s`` (scores of one chunk), ``kv_row`` (the chunk's rows in the flat K/V
    views), ``acc`` (dot-product partial sums) and ``st`` = (running max, running sum, chunk max).
    """
    vq, vv, width = simd_lanes(d_qk), simd_lanes(d_v), acc_width(d_qk)
    per_line_k = per_line_v = CACHE_LINE // tvm.runtime.DataType(qkv_dtype).itemsize
    k_lines, v_lines = -(-d_qk // per_line_k), -(-d_v // per_line_v)

    @T.macro
    def load_q(
        q: T.Buffer,
        src: T.Buffer,
        row: T.int32,
        head: T.int32,
        pos: T.int32,
        rotary_mode: T.int32,
        rope_theta: T.float32,
        rope_scale: T.float32,
    ):
        if rotary_mode == 1:
            for d in T.serial(d_qk):
                q[d] = T.Cast("float32", _rope(src, pos, d_qk, rope_theta, rope_scale, (row, head, d), qkv_dtype, rope_scaling))
        else:
            for o in T.serial(d_qk // vq):
                for i in T.vectorized(vq):
                    q[o * vq + i] = T.Cast("float32", src[row, head, o * vq + i])

    @T.macro
    def init(o_loc: T.Buffer, st: T.Buffer):
        for o in T.serial(d_v // vv):
            for i in T.vectorized(vv):
                o_loc[o * vv + i] = T.float32(0)
        st[0] = T.float32(M_INIT)
        st[1] = T.float32(1)

    @T.macro
    def chunk_update(
        q: T.Buffer,
        o_loc: T.Buffer,
        s: T.Buffer,
        kv_row: T.Buffer,
        acc: T.Buffer,
        k_rot: T.Buffer,
        st: T.Buffer,
        K2: T.Buffer,
        V2: T.Buffer,
        slot: T.int32,
        rows: T.int32,
        pos0: T.int32,
        rotary_mode: T.int32,
        rope_theta: T.float32,
        rope_scale: T.float32,
        sm_scale: T.float32,
    ):
        # scores of the chunk (log2 domain)
        for r in T.serial(rows):
            for i in T.vectorized(width):
                acc[i] = T.float32(0)
            if rotary_mode == 1:
                for d in T.serial(d_qk):
                    k_rot[d] = T.Cast(
                        "float32",
                        _rope(K2, pos0 + r, d_qk, rope_theta, rope_scale, (kv_row[slot + r], d), qkv_dtype, rope_scaling),
                    )
                for o in T.serial(d_qk // width):
                    for i in T.vectorized(width):
                        acc[i] = acc[i] + q[o * width + i] * k_rot[o * width + i]
            else:
                for o in T.serial(d_qk // width):
                    for i in T.vectorized(width):
                        acc[i] = acc[i] + q[o * width + i] * T.Cast("float32", K2[kv_row[slot + r], o * width + i])
            # tree sum of the partial sums (width is a power of two up to 16)
            if width >= 16:
                for i in T.vectorized(8):
                    acc[i] = acc[i] + acc[i + 8]
            if width >= 8:
                for i in T.vectorized(4):
                    acc[i] = acc[i] + acc[i + 4]
            if width >= 4:
                for i in T.vectorized(2):
                    acc[i] = acc[i] + acc[i + 2]
            if width >= 2:
                acc[0] = acc[0] + acc[1]
            s[r] = acc[0] * (sm_scale * T.float32(LOG2E))
        # one rescale of O and of the running sum per chunk
        st[2] = st[0]
        for r in T.serial(rows):
            st[2] = T.max(st[2], s[r])
        alpha: T.let[T.float32] = T.exp2(st[0] - st[2])
        st[0] = st[2]
        st[1] = st[1] * alpha
        for o in T.serial(d_v // vv):
            for i in T.vectorized(vv):
                o_loc[o * vv + i] = o_loc[o * vv + i] * alpha
        for r in T.serial(rows):
            p: T.let[T.float32] = T.exp2(s[r] - st[0])
            st[1] = st[1] + p
            for o in T.serial(d_v // vv):
                for i in T.vectorized(vv):
                    o_loc[o * vv + i] = o_loc[o * vv + i] + p * T.Cast("float32", V2[kv_row[slot + r], o * vv + i])

    @T.macro
    def prefetch(K2: T.Buffer, V2: T.Buffer, kv_row: T.Buffer, slot: T.int32, rows: T.int32):
        for r in T.serial(rows):
            for line in T.unroll(k_lines):
                T.evaluate(T.call_intrin("void", "tirx.prefetch", T.address_of(K2[kv_row[slot + r], line * per_line_k]), 0, PREFETCH_LOCALITY, 1))
            for line in T.unroll(v_lines):
                T.evaluate(T.call_intrin("void", "tirx.prefetch", T.address_of(V2[kv_row[slot + r], line * per_line_v]), 0, PREFETCH_LOCALITY, 1))

    @T.macro
    def store(o_loc: T.Buffer, st: T.Buffer, out: T.Buffer, lse: T.Buffer, row: T.int32, head: T.int32):
        for o in T.serial(d_v // vv):
            for i in T.vectorized(vv):
                out[row, head, o * vv + i] = T.Cast(qkv_dtype, o_loc[o * vv + i] / st[1])
        lse[row, head] = st[0] + T.log2(st[1])

    return load_q, init, prefetch, chunk_update, store


def decode_paged_kv(
    num_kv_heads: int,
    num_qo_heads: int,
    head_dim: int,
    qkv_dtype: str,
    sliding_window: bool,
    rope_scaling: dict[str, Any],
    page_size: int = 16,
) -> tirx.PrimFunc:
    """Drop-in for TVM's ``_attention_decode_cpu`` (same arguments): one query token per sequence,
    parallel over (sequence, query head)."""
    H_qo, H_kv, D = num_qo_heads, num_kv_heads, head_dim
    group_size = H_qo // H_kv
    width = acc_width(D)
    load_q, init, prefetch, chunk_update, store = _softmax_macros(D, D, qkv_dtype, rope_scaling)
    global_symbol = "batch_decode_paged_kv_cpu" + ("_sliding_window" if sliding_window else "")

    @T.prim_func
    def batch_decode_paged_kv_cpu(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": global_symbol})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        Q = T.match_buffer(Q_handle, (B, H_qo, D), qkv_dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, H_kv, page_size, D), qkv_dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(output_handle, (B, H_qo, D), qkv_dtype)
        lse = T.match_buffer(lse_handle, (B, H_qo), "float32")
        length_info = _declare_length_info(var_length_info, B, sliding_window, length_info_elem_offset)
        # pages as rows of D: K of (page, kv head, slot) is row ((page * 2) * H_kv + head) * page_size + slot,
        # its V the same row of a view starting H_kv * page_size rows later
        K2 = T.decl_buffer((max_num_pages * 2 * H_kv * page_size, D), qkv_dtype, data=pages.data)
        V2 = T.decl_buffer(
            ((max_num_pages * 2 - 1) * H_kv * page_size, D), qkv_dtype, data=pages.data, elem_offset=H_kv * page_size * D
        )

        for task in T.parallel(B * H_qo):
            b: T.let[T.int32] = task // H_qo
            h: T.let[T.int32] = task % H_qo
            q = T.alloc_buffer((D,), "float32")
            o_loc = T.alloc_buffer((D,), "float32")
            k_rot = T.alloc_buffer((D,), "float32")
            s = T.alloc_buffer((page_size,), "float32")
            kv_row = T.alloc_buffer((RING * page_size,), "int32")
            acc = T.alloc_buffer((width,), "float32")
            st = T.alloc_buffer((3,), "float32")
            first: T.let[T.int32] = page_table_indptr[b]
            last: T.let[T.int32] = page_table_indptr[b + 1]
            n_rows: T.let[T.int32] = T.if_then_else(
                first != last, _get_kv_chunk_len(last - first, page_size, b, length_info, sliding_window), 0
            )
            load_q(q, Q, b, h, q_rope_position[b], rotary_mode, rope_theta, rope_scale)
            init(o_loc, st)
            n_chunks: T.let[T.int32] = (n_rows + page_size - 1) // page_size
            for c in T.serial(n_chunks + AHEAD):  # locate and prefetch chunk c while chunk c - AHEAD is computed
                if c < n_chunks:
                    for r in T.serial(T.min(page_size, n_rows - c * page_size)):
                        pos: T.let[T.int32] = _get_seq_offset(c * page_size + r, b, length_info, sliding_window)
                        kv_row[c % RING * page_size + r] = (
                            page_table_values[first + pos // page_size] * 2 * H_kv + h // group_size
                        ) * page_size + pos % page_size
                    prefetch(K2, V2, kv_row, c % RING * page_size, T.min(page_size, n_rows - c * page_size))
                if c >= AHEAD:
                    chunk_update(
                        q,
                        o_loc,
                        s,
                        kv_row,
                        acc,
                        k_rot,
                        st,
                        K2,
                        V2,
                        (c - AHEAD) % RING * page_size,
                        T.min(page_size, n_rows - (c - AHEAD) * page_size),
                        k_rope_pos_offset[b] + (c - AHEAD) * page_size,
                        rotary_mode,
                        rope_theta,
                        rope_scale,
                        sm_scale,
                    )
            store(o_loc, st, output, lse, b, h)

    return batch_decode_paged_kv_cpu


def prefill_paged_kv(
    h_kv: int, h_q: int, d: int, dtype: str, sliding_window: bool, rope_scaling: dict[str, Any], page_size: int = 16
) -> tirx.PrimFunc:
    """Drop-in for TVM's ``_attention_prefill_cpu`` (same arguments): queries of several tokens per
    sequence against the paged cache, parallel over (query head, query row) of each sequence."""
    group_size = h_q // h_kv
    width = acc_width(d)
    load_q, init, prefetch, chunk_update, store = _softmax_macros(d, d, dtype, rope_scaling)
    global_symbol = "batch_prefill_paged_kv_cpu" + ("_sliding_window" if sliding_window else "")

    @T.prim_func
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_pages: T.handle,
        var_page_indptr: T.handle,
        var_page_values: T.handle,
        var_length_info: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": global_symbol})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(
            var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset
        )
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        length_info = _declare_length_info(var_length_info, batch_size, sliding_window, length_info_elem_offset)
        K2 = T.decl_buffer((max_num_pages * 2 * h_kv * page_size, d), dtype, data=pages.data)
        V2 = T.decl_buffer(
            ((max_num_pages * 2 - 1) * h_kv * page_size, d), dtype, data=pages.data, elem_offset=h_kv * page_size * d
        )

        for b in T.serial(batch_size):
            q0: T.let[T.int32] = q_indptr[b]
            n_q: T.let[T.int32] = q_indptr[b + 1] - q0
            first: T.let[T.int32] = page_indptr[b]
            last: T.let[T.int32] = page_indptr[b + 1]
            n_kv: T.let[T.int32] = T.if_then_else(
                first != last, _get_kv_chunk_len(last - first, page_size, b, length_info, sliding_window), 0
            )
            for task in T.parallel(h_q * n_q):
                h: T.let[T.int32] = task // n_q
                row: T.let[T.int32] = q0 + task % n_q
                n_cols: T.let[T.int32] = T.if_then_else(causal > 0, T.max(0, T.min(n_kv, n_kv - n_q + task % n_q + 1)), n_kv)
                q_loc = T.alloc_buffer((d,), "float32")
                o_loc = T.alloc_buffer((d,), "float32")
                k_rot = T.alloc_buffer((d,), "float32")
                s = T.alloc_buffer((page_size,), "float32")
                kv_row = T.alloc_buffer((RING * page_size,), "int32")
                acc = T.alloc_buffer((width,), "float32")
                st = T.alloc_buffer((3,), "float32")
                load_q(q_loc, q, row, h, q_rope_position[row], rotary_mode, rope_theta, rope_scale)
                init(o_loc, st)
                n_chunks: T.let[T.int32] = (n_cols + page_size - 1) // page_size
                for c in T.serial(n_chunks + AHEAD):
                    if c < n_chunks:
                        for r in T.serial(T.min(page_size, n_cols - c * page_size)):
                            pos: T.let[T.int32] = _get_seq_offset(c * page_size + r, b, length_info, sliding_window)
                            kv_row[c % RING * page_size + r] = (
                                page_values[first + pos // page_size] * 2 * h_kv + h // group_size
                            ) * page_size + pos % page_size
                        prefetch(K2, V2, kv_row, c % RING * page_size, T.min(page_size, n_cols - c * page_size))
                    if c >= AHEAD:
                        chunk_update(
                            q_loc,
                            o_loc,
                            s,
                            kv_row,
                            acc,
                            k_rot,
                            st,
                            K2,
                            V2,
                            (c - AHEAD) % RING * page_size,
                            T.min(page_size, n_cols - (c - AHEAD) * page_size),
                            k_rope_pos_offset[b] + (c - AHEAD) * page_size,
                            rotary_mode,
                            rope_theta,
                            rope_scale,
                            sm_scale,
                        )
                store(o_loc, st, output, lse, row, h)

    return batch_prefill_paged_kv_cpu


def prefill_ragged_kv(
    h_kv: int, h_q: int, d_qk: int, d_v: int, dtype: str, rope_scaling: dict[str, Any], chunk: int = 16
) -> tirx.PrimFunc:
    """Drop-in for TVM's ``_attention_prefill_ragged_cpu`` (same arguments): the new tokens' queries
    against their own K/V, parallel over (query head, query row) of each sequence."""
    group_size = h_q // h_kv
    width = acc_width(d_qk)
    load_q, init, prefetch, chunk_update, store = _softmax_macros(d_qk, d_v, dtype, rope_scaling)

    @T.prim_func
    def batch_prefill_ragged_kv(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        var_kv_indptr: T.handle,
        var_q_rope_position: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "batch_prefill_ragged_kv"})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d_qk), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d_qk), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d_v), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_position_elem_offset)
        k_rope_pos_offset = T.match_buffer(
            var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset
        )
        output = T.match_buffer(var_output, (qo_len, h_q, d_v), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")
        # K/V as rows: token t, kv head j is row t * h_kv + j
        K2 = T.decl_buffer((kv_len * h_kv, d_qk), dtype, data=k.data)
        V2 = T.decl_buffer((kv_len * h_kv, d_v), dtype, data=v.data)

        for b in T.serial(batch_size):
            q0: T.let[T.int32] = q_indptr[b]
            n_q: T.let[T.int32] = q_indptr[b + 1] - q0
            k0: T.let[T.int32] = kv_indptr[b]
            n_kv: T.let[T.int32] = kv_indptr[b + 1] - k0
            for task in T.parallel(h_q * n_q):
                h: T.let[T.int32] = task // n_q
                row: T.let[T.int32] = q0 + task % n_q
                n_cols: T.let[T.int32] = T.if_then_else(causal > 0, T.max(0, T.min(n_kv, n_kv - n_q + task % n_q + 1)), n_kv)
                q_loc = T.alloc_buffer((d_qk,), "float32")
                o_loc = T.alloc_buffer((d_v,), "float32")
                k_rot = T.alloc_buffer((d_qk,), "float32")
                s = T.alloc_buffer((chunk,), "float32")
                kv_row = T.alloc_buffer((RING * chunk,), "int32")
                acc = T.alloc_buffer((width,), "float32")
                st = T.alloc_buffer((3,), "float32")
                load_q(q_loc, q, row, h, q_rope_position[row], rotary_mode, rope_theta, rope_scale)
                init(o_loc, st)
                n_chunks: T.let[T.int32] = (n_cols + chunk - 1) // chunk
                for c in T.serial(n_chunks + AHEAD):
                    if c < n_chunks:
                        for r in T.serial(T.min(chunk, n_cols - c * chunk)):
                            kv_row[c % RING * chunk + r] = (k0 + c * chunk + r) * h_kv + h // group_size
                        prefetch(K2, V2, kv_row, c % RING * chunk, T.min(chunk, n_cols - c * chunk))
                    if c >= AHEAD:
                        chunk_update(
                            q_loc,
                            o_loc,
                            s,
                            kv_row,
                            acc,
                            k_rot,
                            st,
                            K2,
                            V2,
                            (c - AHEAD) % RING * chunk,
                            T.min(chunk, n_cols - (c - AHEAD) * chunk),
                            k_rope_pos_offset[b] + (c - AHEAD) * chunk,
                            rotary_mode,
                            rope_theta,
                            rope_scale,
                            sm_scale,
                        )
                store(o_loc, st, output, lse, row, h)

    return batch_prefill_ragged_kv


def replace_cpu_attention(
    mod: Any, num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, rope_scaling: dict[str, Any]
) -> Any:
    """``mod`` (after ``TIRPagedKVCache`` was added for an llvm target) with TVM's scalar CPU
    attention kernels replaced by the ones here, under the same GlobalVars, so the KV-cache
    creation call that refers to them stays as it is. Arguments: what the cache was created with.

    Raises ``RuntimeError`` when the module holds none of them (a TVM that names them differently)."""
    builders = {
        "batch_decode_paged_kv_cpu": lambda: decode_paged_kv(num_kv_heads, num_qo_heads, head_dim, dtype, False, rope_scaling),
        "batch_decode_paged_kv_cpu_sliding_window": lambda: decode_paged_kv(
            num_kv_heads, num_qo_heads, head_dim, dtype, True, rope_scaling
        ),
        "batch_prefill_paged_kv_cpu": lambda: prefill_paged_kv(num_kv_heads, num_qo_heads, head_dim, dtype, False, rope_scaling),
        "batch_prefill_paged_kv_cpu_sliding_window": lambda: prefill_paged_kv(
            num_kv_heads, num_qo_heads, head_dim, dtype, True, rope_scaling
        ),
        "batch_prefill_ragged_kv": lambda: prefill_ragged_kv(num_kv_heads, num_qo_heads, head_dim, head_dim, dtype, rope_scaling),
    }
    found = set()
    for gv, func in list(mod.functions.items()):
        symbol = func.attrs.get("global_symbol") if isinstance(func, tirx.PrimFunc) and func.attrs is not None else None
        if symbol in builders:
            mod.update_func(gv, builders[symbol]())
            found.add(symbol)
    if found != set(builders):
        raise RuntimeError(
            f"CPU attention kernels {sorted(set(builders) - found)} not found in the module; TVM's TIRPagedKVCache changed"
        )
    return mod
