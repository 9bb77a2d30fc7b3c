"""Run a compiled model library with its tensor cache on the host, the way MLC's runtime drives it.

Why: tests, the chat runner, the evaluation and the benchmarks all need the same short sequence —
load the library into TVM's Relax VM, load params in the order ``_metadata`` lists, create the paged
KV cache, then per step ``begin_forward → embed → prefill/decode → end_forward`` — so it lives here
once. Only TVM's runtime is used; nothing of MLC-LLM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from neox_mlc.common import WorkflowError, read_json, usable_cpus
from neox_mlc.tensor_cache import verify_cache

PAGE_SIZE = 16


class ModelRuntime:
    """One sequence (id 0) on one device: prefill a prompt, then decode token by token."""

    def __init__(self, lib: str | Path, params_dir: str | Path, chat_config: str | Path | None = None, device: str = "cpu") -> None:
        # TVM's thread pool counts physical cores, which is 1 on 2-vCPU machines; use every CPU
        # this process may run on.
        os.environ.setdefault("TVM_NUM_THREADS", str(usable_cpus()))
        import tvm
        from tvm import relax
        from tvm.contrib import tvmjs

        self.tvm = tvm
        self.dev = tvm.device(device)
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), self.dev)
        self.metadata: dict[str, Any] = json.loads(str(self.vm["_metadata"]()))
        cfg_path = Path(chat_config) if chat_config else Path(params_dir) / "mlc-chat-config.json"
        self.chat_config = read_json(cfg_path, "chat config")
        verify_cache(params_dir)
        loaded, _ = tvmjs.load_tensor_cache(str(params_dir), self.dev)
        missing = [p["name"] for p in self.metadata["params"] if p["name"] not in loaded]
        if missing:
            raise WorkflowError(f"params in {params_dir} lack {missing[0]} that the library expects ({len(missing)} missing)")
        self.params = [loaded[p["name"]] for p in self.metadata["params"]]
        self.context_window = int(self.metadata["context_window_size"])
        self.prefill_chunk = int(self.metadata["prefill_chunk_size"])
        self.hidden = int(self.chat_config["model_config"]["hidden_size"])
        self._f_add = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
        self._f_begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        self._f_end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        self._f_remove = tvm.get_global_func("vm.builtin.kv_state_remove_sequence")
        shape = tvm.runtime.ShapeTuple
        self.kv = self.vm["create_tir_paged_kv_cache"](
            shape([1]), shape([self.context_window]), shape([self.prefill_chunk]), shape([PAGE_SIZE]), shape([0])
        )
        self._f_add(self.kv, 0)
        self.length = 0

    def reset(self) -> None:
        """Forget the sequence (the KV cache is reused)."""
        self._f_remove(self.kv, 0)
        self._f_add(self.kv, 0)
        self.length = 0

    def _embed(self, ids: list[int]) -> Any:
        tvm = self.tvm
        emb = self.vm["embed"](tvm.runtime.tensor(np.asarray(ids, dtype="int32"), self.dev), self.params)
        return emb._create_view((1, len(ids), self.hidden), emb.dtype)

    def _check_room(self, n: int) -> None:
        if self.length + n > self.context_window:
            raise WorkflowError(
                f"sequence of {self.length + n} tokens exceeds the context window {self.context_window} "
                "(max_seq_len the library was compiled for)"
            )

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Feed ``ids`` (in chunks of at most prefill_chunk_size); return float32 logits ``[vocab]`` of the last one."""
        if not ids:
            raise WorkflowError("prefill needs at least one token")
        return self._forward_chunks(ids, "prefill")[-1].reshape(-1)

    def decode(self, token: int) -> np.ndarray:
        """Feed one token; return float32 logits ``[vocab]``."""
        self._check_room(1)
        tvm = self.tvm
        self._f_begin(self.kv, tvm.runtime.ShapeTuple([0]), tvm.runtime.ShapeTuple([1]))
        logits, _ = self.vm["decode"](self._embed([token]), self.kv, self.params)
        self._f_end(self.kv)
        self.length += 1
        return logits.numpy().reshape(-1)

    def prefill_all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits for every position of ``ids`` (``batch_verify``), for perplexity; ``[len, vocab]``."""
        chunks = self._forward_chunks(ids, "batch_verify")
        return np.concatenate([c.reshape(-1, c.shape[-1]) for c in chunks])

    def _forward_chunks(self, ids: list[int], function: str) -> list[np.ndarray]:
        """Feed ``ids`` through ``function`` in chunks of at most prefill_chunk_size tokens."""
        self._check_room(len(ids))
        shape = self.tvm.runtime.ShapeTuple
        out = []
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start : start + self.prefill_chunk]
            self._f_begin(self.kv, shape([0]), shape([len(chunk)]))
            logits, _ = self.vm[function](self._embed(chunk), self.kv, self.params)
            self._f_end(self.kv)
            self.length += len(chunk)
            out.append(logits.numpy())
        return out
