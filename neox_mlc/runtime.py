"""Run a compiled model library with its tensor cache on the host, the way MLC's runtime drives it.

Why: tests, the chat runner, the evaluation and the benchmarks all need the same short sequence —
load the library into TVM's Relax VM, load params in the order ``_metadata`` lists, create the paged
KV cache, then per step ``begin_forward → embed → prefill/decode → end_forward`` — so it lives here
once. Only TVM's runtime is used (it works with a runtime-only TVM, ``TVM_USE_RUNTIME_LIB=1``: the
VM comes from ``tvm.runtime.vm``, not ``tvm.relax``); nothing of MLC-LLM.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neox_mlc.common import WorkflowError, read_json, usable_cpus
from neox_mlc.verify import verify_params

PAGE_SIZE = 16
# TVM's pool: worker threads pinned one per core cannot leave a core another process is using, and
# each worker spins 300000 sched_yield()s after every kernel; both hurt on a shared machine.
POOL_ENV = {"TVM_BIND_THREADS": "0", "TVM_THREAD_POOL_SPIN_COUNT": "10000"}
CLEAR_RATIO = 1.5  # ThreadChooser ends a probe early when one count is this much slower
IDLE_SLACK = 0.25  # CPUs: a CpuMeter reading this close to every thread's CPU counts as no other load
_BIG_CORES = 1  # tvm::runtime::threading::ThreadGroup::kBig: every worker, no affinity change


class ThreadChooser:
    """Choose the decode thread count that is fastest *now*, re-checking every ``period`` steps.

    Why: TVM's pool splits every parallel loop statically into one equal share per thread, and the
    step waits for the slowest share. When another process holds one of the CPUs, that share runs
    at a fraction of its speed and N threads fall far below one (measured on 2 shared CPUs: 1.2 vs
    5.1 tok/s). So decode times a few steps at each candidate count, interleaved, and keeps the one
    with the smallest median; the probe is repeated so that a load that comes or goes is followed.
    The thread count changes only which thread computes which rows: the results are bit-identical.
    Where ``free_cpus`` reads a CPU free for every thread, the full count is taken without timing:
    a probe's one-thread steps cost 4 % of a 64-step 162.5 M q0f16 decode on an idle machine (paired
    runs, median of 8), to learn what an idle machine already says.
    """

    def __init__(self, candidates: Sequence[int], probe_steps: int = 2, period: int = 48, free_cpus: Callable[[], float] | None = None) -> None:
        """``free_cpus``: CPUs other processes left idle lately (:class:`CpuMeter`); counts above it are not probed."""
        if not candidates or min(candidates) < 1:
            raise WorkflowError(f"thread candidates {list(candidates)} must be positive counts")
        self.candidates = sorted(set(candidates), reverse=True)
        self.probe_steps, self.period = probe_steps, period
        self.free_cpus = free_cpus
        self.choice = self.candidates[0]
        self._plan: list[int] = []
        self._times: dict[int, list[float]] = {}
        self._until_probe = 0

    def _probed(self) -> list[int]:
        """The counts worth timing now: none above the CPUs other processes leave free (at least one);
        only the largest when those cover it (nothing to learn)."""
        if self.free_cpus is None:
            return self.candidates
        free = self.free_cpus()
        if free >= self.candidates[0] - IDLE_SLACK:
            return self.candidates[:1]
        room = max(1, int(free + 0.5))
        return [c for c in self.candidates if c <= room] or [min(self.candidates)]

    def next_threads(self) -> int:
        """Threads for the next step (starts a probe when one is due)."""
        if not self._plan and self._until_probe <= 0 and len(self.candidates) > 1:
            probed = self._probed()
            if len(probed) == 1:  # no CPU to spare (a step on more threads would wait for a busy one), or all free
                self.choice, self._until_probe = probed[0], self.period
                return self.choice
            self._plan = [c for _ in range(self.probe_steps) for c in probed]
            self._times = {c: [] for c in probed}
        return self._plan[0] if self._plan else self.choice

    def record(self, threads: int, seconds: float) -> None:
        """The step just run with ``threads`` took ``seconds``."""
        if self._plan:
            self._times[threads].append(seconds)
            self._plan.pop(0)
            if self._plan and len(self._plan) % len(self._times) == 0 and self._clear_winner():
                self._plan = []  # a slow count is not tried again just to confirm it is slow
            if not self._plan:
                self.choice = min(self._times, key=lambda c: statistics.median(self._times[c]))
                self._until_probe = self.period
        else:
            self._until_probe -= 1


    def _clear_winner(self) -> bool:
        """After a full round of the probe: is the slowest count already ``CLEAR_RATIO`` × the fastest?"""
        medians = [statistics.median(t) for t in self._times.values()]
        return max(medians) >= CLEAR_RATIO * min(medians)


class CpuMeter:
    """CPUs that other processes left idle since the previous reading, from ``/proc/stat`` and this process's own CPU time.

    Why: TVM splits a parallel loop into one fixed share per thread and waits for the slowest, so a
    thread on a CPU another process is using stalls the whole step; timing such a step to find that
    out costs more than one-thread decode gains back (162.5 M q4f16_0 under 4 busy processes on 2
    CPUs: 25.5 tok/s with probing, 46 on one thread). Where ``/proc/stat`` is unreadable every CPU
    counts as free (the probe decides, as before).
    """

    def __init__(self, cpus: set[int]) -> None:
        self.cpus = cpus  # the CPUs this process may run on (a Slurm job's allotment, not the node)
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        busy = 0.0
        try:
            for line in Path("/proc/stat").read_text().splitlines():
                name, *values = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus:
                    fields = [float(x) for x in values]
                    busy += sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)  # all but idle, iowait
        except (OSError, ValueError, IndexError):
            return None
        own = sum(os.times()[:2])
        return time.monotonic(), busy / float(os.sysconf("SC_CLK_TCK")), own

    def __call__(self) -> float:
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None or now[0] - last[0] < 0.05:
            return float(len(self.cpus))
        others = max(0.0, (now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0])
        return max(0.0, len(self.cpus) - others)


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: /proc/stat is absent too, and every CPU counts as free
        return set(range(os.cpu_count() or 1))


def _pool_threads(value: str) -> int:
    """TVM_NUM_THREADS as a count (TVM reads 0 or less as one thread)."""
    try:
        return max(1, int(value))
    except ValueError:
        raise WorkflowError(f"TVM_NUM_THREADS={value!r} is not a thread count; allowed: a positive integer") from None


def thread_candidates(n: int) -> list[int]:
    """All threads, half of them, one: the counts decode probes (deduplicated)."""
    return sorted({n, max(1, n // 2), 1}, reverse=True)


# (``_metadata`` "params" entries, device) -> name -> tensor on that device
ParamMaker = Callable[[list[dict[str, Any]], Any], dict[str, Any]]


HUGE_PAGE = 2 << 20  # bytes: an x86-64 / arm64 transparent huge page
KDL_CPU = 1  # DLPack's device type of host memory
PARAM_ALIGN = 4096  # bytes: each parameter starts on a page (TVM's kernels assume 64)


def on_huge_pages(tensors: list[Any]) -> list[Any]:
    """The same tensors moved into one anonymous mapping backed by transparent huge pages (Linux).

    Why: decode streams every weight from DRAM once a step, and with 4 KiB pages that stream crosses
    a page — a TLB miss and a restart of the hardware prefetcher — every 4 KiB. This machine's THP
    setting is ``madvise``, so TVM's allocations never got huge pages. A plain read of 256 MB on
    this host (AMD EPYC, 2 vCPUs): 1 thread 19–22 → 29–30 GB/s, 2 threads 25–31 → 33–34 GB/s with
    ``MADV_HUGEPAGE`` before the first touch. Tensors are copied one at a time, each original freed
    as soon as it is copied (peak memory grows by one tensor). Where the kernel has no THP, the
    mapping is ordinary memory and nothing else changes.
    """
    import mmap

    import numpy as np
    import tvm

    dtypes = [np.dtype(str(t.dtype)) if str(t.dtype) in ("float16", "float32", "uint32", "int32", "int8", "uint8") else None for t in tensors]
    if not hasattr(mmap, "MADV_HUGEPAGE") or None in dtypes:
        return tensors
    sizes = [int(np.prod(t.shape, dtype=np.int64)) * dt.itemsize for t, dt in zip(tensors, dtypes, strict=True)]
    offsets = np.concatenate([[0], np.cumsum([-(-n // PARAM_ALIGN) * PARAM_ALIGN for n in sizes])]).astype(np.int64)
    memory = mmap.mmap(-1, (-(-int(offsets[-1]) // HUGE_PAGE) + 1) * HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # whole huge pages after alignment
    memory.madvise(mmap.MADV_HUGEPAGE)
    base = np.frombuffer(memory, dtype=np.uint8)
    start = -base.ctypes.data % HUGE_PAGE
    trim = _malloc_trim()
    moved = []
    for i, (dt, n) in enumerate(zip(dtypes, sizes, strict=True)):
        view = base[start + offsets[i] : start + offsets[i] + n].view(dt).reshape(tuple(int(d) for d in tensors[i].shape))
        target = tvm.runtime.from_dlpack(view)
        tensors[i].copyto(target)
        tensors[i] = None  # the original is freed now ...
        trim()  # ... and its pages returned (glibc keeps freed heap memory otherwise: 3.6 B q4f16_0 peak RSS 4.5 → 2.6 GiB)
        moved.append(target)
    return moved


def _malloc_trim() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)`` (a no-op elsewhere): give freed heap pages back to the OS."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


class ModelRuntime:
    """One sequence (id 0) on one device: prefill a prompt, then decode token by token.

    Parameters come from ``params_dir`` (a tensor cache), or, with ``params_dir=None``, from
    ``make_params`` given the library's parameter list (random weights for speed checks).
    """

    def __init__(
        self,
        lib: str | Path,
        params_dir: str | Path | None,
        chat_config: str | Path | None = None,
        device: str = "cpu",
        verify: bool = True,
        make_params: ParamMaker | None = None,
    ) -> None:
        """``verify``: check every shard's md5 against tensor-cache.json first (False only when the
        caller has just verified the same files, e.g. the chat runner against MANIFEST.json)."""
        if params_dir is None and (make_params is None or chat_config is None):
            raise WorkflowError("a runtime without a params directory needs make_params and chat_config")
        if verify and params_dir is not None:
            verify_params(params_dir)
        # TVM's thread pool counts physical cores, which is 1 on 2-vCPU machines; use every CPU
        # this process may run on (TVM reads these once, when its pool starts).
        os.environ.setdefault("TVM_NUM_THREADS", str(usable_cpus()))
        for key, value in POOL_ENV.items():
            os.environ.setdefault(key, value)
        self.max_threads = _pool_threads(os.environ["TVM_NUM_THREADS"])  # checked before anything is loaded
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.tvm = tvm
        self.dev = tvm.device(device)
        self.vm = VirtualMachine(tvm.runtime.load_module(str(lib)), self.dev)
        self.metadata: dict[str, Any] = json.loads(str(self.vm["_metadata"]()))
        cfg_path = Path(chat_config) if chat_config else Path(params_dir) / "mlc-chat-config.json"
        self.chat_config = read_json(cfg_path, "chat config")
        if params_dir is None:
            loaded = make_params(self.metadata["params"], self.dev)
        else:
            from tvm.contrib import tvmjs

            loaded, _ = tvmjs.load_tensor_cache(str(params_dir), self.dev)
        missing = [p["name"] for p in self.metadata["params"] if p["name"] not in loaded]
        if missing:
            raise WorkflowError(f"params in {params_dir} lack {missing[0]} that the library expects ({len(missing)} missing)")
        self.params = [loaded.pop(p["name"]) for p in self.metadata["params"]]
        del loaded
        if self.dev.dlpack_device_type() == KDL_CPU and os.environ.get("NEOX_MLC_HUGE_PAGES", "1") != "0":
            self.params = on_huge_pages(self.params)
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
        self.threads = self.max_threads
        self._config_pool = tvm.get_global_func("runtime.config_threadpool")
        adaptive = os.environ.get("NEOX_MLC_ADAPTIVE_THREADS", "1") != "0"
        self.chooser = ThreadChooser(
            thread_candidates(self.max_threads) if adaptive else [self.max_threads], free_cpus=CpuMeter(_affinity()) if adaptive else None
        )

    def set_threads(self, n: int) -> None:
        """Run the following kernels on ``n`` threads of TVM's pool (at most TVM_NUM_THREADS)."""
        n = max(1, min(n, self.max_threads))
        if n != self.threads:
            self._config_pool(_BIG_CORES, n)
            self.threads = n

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
        threads = self.chooser.next_threads()
        self.set_threads(threads)
        start = time.perf_counter()
        self._f_begin(self.kv, tvm.runtime.ShapeTuple([0]), tvm.runtime.ShapeTuple([1]))
        logits, _ = self.vm["decode"](self._embed([token]), self.kv, self.params)
        self._f_end(self.kv)
        out = logits.numpy().reshape(-1)
        self.chooser.record(threads, time.perf_counter() - start)
        self.length += 1
        return out

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


def kernel_profile(rt: ModelRuntime, steps: int = 16, prompt: int = 128) -> dict[str, Any]:
    """CPU milliseconds per decode step spent in each VM call (kernel or builtin), after a ``prompt``-token prefill.

    Why CPU time (the calling thread's, ``time.thread_time``) rather than wall time: on a shared
    machine wall time includes the time this process waits for a CPU, which swamps the kernels'
    own differences; run it with TVM_NUM_THREADS=1 so that all the work is on the timed thread.
    The instrument's own Python callback adds a few microseconds to every call.
    """
    import collections

    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    began: dict[str, float] = {}

    def instrument(func: Any, name: str, before: bool, ret: Any, *args: Any) -> int:
        if before:
            began[name] = time.thread_time()
        else:
            spent[name] += time.thread_time() - began[name]
            calls[name] += 1
        return 0

    rt.reset()
    logits = rt.prefill([5 + (i * 7) % 200 for i in range(prompt)])
    rt.vm.set_instrument(instrument)
    start = time.thread_time()
    try:
        for _ in range(steps):
            logits = rt.decode(int(logits.argmax()))
    finally:
        rt.vm.set_instrument(None)
    total = (time.thread_time() - start) / steps
    kernels = sorted(spent.items(), key=lambda kv: -kv[1])
    return {
        "steps": steps,
        "threads": rt.threads,
        "step_cpu_ms": round(total * 1e3, 3),
        "kernels": [{"name": k, "cpu_ms_per_step": round(v / steps * 1e3, 3), "calls_per_step": calls[k] // steps} for k, v in kernels],
    }
