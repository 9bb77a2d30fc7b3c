"""``neox-mlc bench_line``: the main job on a stand-in of LINE's 3.6B checkpoint, measured per rule.

Why: the README's resource table for the real model must be measurements, not scaling estimates, and
the real checkpoint cannot be downloaded here. This writes the stand-in (LINE's config and file layout,
random float16: ~7.2 GB at ``--full-size``), copies the workflow into a fresh work directory, runs the
main target (``dist/<model>-q4f16_0``, the iPhone library plus a host ``llvm`` one to time the bundle)
with the checkpoint as ``local_path``, and records per rule: jobs, wall time, CPU time and peak RSS.
Every job's process tree is sampled (each job is one ``python scripts/<step>.py`` process), so rules
without a ``benchmark:`` file are measured too. Then the bundle's size and the host library's prefill
and decode tokens/s (128-token prompt, 64 greedy steps, as bench_runtime). Writes one JSON file.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from neox_mlc.benchtools import GIB, copy_workflow, run_child, write_result
from neox_mlc.common import WorkflowError, run_cli
from neox_mlc.line_fixture import LINE_SHAPE, make_line_checkpoint

MODEL = "line-3.6b-standin"
QUANT = "q4f16_0"
WORK_MARKER = ".neox-mlc-bench-line"
WORKFLOW = ("Snakefile", "config", "config.yaml", "data", "envs", "neox_mlc", "profiles", "pyproject.toml", "report", "rules", "scripts")


def rule_of(cmdline: list[str]) -> str | None:
    """Which rule a job process runs, from its command line (``python scripts/<step>.py ...``)."""
    script = next((Path(a).stem for a in cmdline if a.startswith("scripts/") and a.endswith(".py")), None)
    if script is None:
        return None
    if script == "convert_weight":
        return "weight_plan" if "--plan-only" in cmdline else "weights_index" if "--index" in cmdline else "convert_shard"
    if script == "fetch_model":
        return "model_config" if "--config-only" in cmdline else "fetch_model"
    if script == "package":
        return "app_config" if "app-config" in cmdline else "package"
    if script == "compile":
        return "compile"
    return {"make_tokenizer": "tokenizer", "gen_config": "gen_config"}.get(script, script)


class JobSampler:
    """Samples Snakemake's job processes (and their children) every ``interval`` seconds."""

    def __init__(self, root_pid: int, interval: float = 0.2) -> None:
        self.root_pid, self.interval = root_pid, interval
        self.jobs: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> JobSampler:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        root = psutil.Process(self.root_pid)
        while not self._stop.is_set():
            now = time.perf_counter()
            try:
                procs = root.children(recursive=True)
            except psutil.Error:
                break
            for proc in procs:
                try:
                    cmd = proc.cmdline()
                    rule = rule_of(cmd)
                    if rule is None:
                        continue
                    tree = [proc, *proc.children(recursive=True)]
                    rss = sum(p.memory_info().rss for p in tree)
                    cpu = sum(sum(p.cpu_times()[:2]) for p in tree)
                except psutil.Error:
                    continue
                job = self.jobs.setdefault(proc.pid, {"rule": rule, "start": now, "cmd": " ".join(cmd[-6:])})
                job["end"], job["peak_rss"] = now, max(job.get("peak_rss", 0), rss)
                job["cpu_s"] = max(job.get("cpu_s", 0.0), cpu)
            self._stop.wait(self.interval)

    def per_rule(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for job in sorted(self.jobs.values(), key=lambda j: j["start"]):
            r = out.setdefault(job["rule"], {"jobs": 0, "wall_s": 0.0, "cpu_s": 0.0, "peak_rss_gib": 0.0})
            r["jobs"] += 1
            r["wall_s"] = round(r["wall_s"] + job["end"] - job["start"] + self.interval, 1)
            r["cpu_s"] = round(r["cpu_s"] + job["cpu_s"], 1)
            r["peak_rss_gib"] = round(max(r["peak_rss_gib"], job["peak_rss"] / GIB), 3)
        return out


def snakemake_benchmarks(work: Path) -> dict[str, dict[str, Any]]:
    """Snakemake's own ``benchmark:`` files (wall s, max_rss MB, cpu_time s) for the rules that have one."""
    out = {}
    for tsv in sorted((work / "benchmarks").rglob("*.tsv")):
        head, row = tsv.read_text().splitlines()[:2]
        rec = dict(zip(head.split("\t"), row.split("\t"), strict=True))
        out[str(tsv.relative_to(work / "benchmarks"))] = {"wall_s": float(rec["s"]), "max_rss_mb": float(rec["max_rss"]), "cpu_s": float(rec["cpu_time"])}
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cpus": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "load_avg_before": [round(x, 2) for x in os.getloadavg()]}


def prepare(work: Path, shape: dict[str, int]) -> dict[str, Any]:
    """A fresh copy of the workflow in ``work`` with the stand-in checkpoint and an overlay config."""
    if work.exists() and any(work.iterdir()):
        # only ever delete a work directory this benchmark made
        if not (work / WORK_MARKER).is_file():
            raise WorkflowError(f"--workdir {work} is not empty and was not made by bench_line; allowed: an empty or new directory")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).write_text("bench_line work directory: removed and rewritten by the next run\n")
    copy_workflow(work, WORKFLOW)
    ckpt = work / "resources" / "standin"
    t0 = time.perf_counter()
    make_line_checkpoint(ckpt, **shape)
    written = time.perf_counter() - t0
    overlay = {"build_models": [MODEL], "quantizations": [QUANT], "target": "iphone", "extra_targets": ["llvm"], "max_seq_len": 768,
               "models": {MODEL: {"local_path": "resources/standin", "revision": "standin", "conv_template": "line_llm"}}}
    (work / "bench.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    return {"checkpoint_bytes": dir_bytes(ckpt), "checkpoint_write_s": round(written, 1)}


def run_workflow(work: Path, cores: int) -> tuple[float, dict[str, Any]]:
    cmd = [sys.executable, "-m", "snakemake", f"dist/{MODEL}-{QUANT}", f"-c{cores}", "--configfile", "bench.yaml"]
    start = time.perf_counter()
    with open(work / "snakemake.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(work)})
        with JobSampler(proc.pid) as sampler:
            rc = proc.wait()
    wall = time.perf_counter() - start
    if rc != 0:
        raise WorkflowError(f"the workflow failed (exit {rc}); see {work / 'snakemake.log'}")
    return wall, sampler.per_rule()


def host_speed(work: Path, prompt: int, decode: int, threads: int) -> dict[str, Any]:
    qdir = work / "build" / MODEL / QUANT
    lib = next((qdir / "lib").glob("*-llvm.so"))
    return run_child(
        f"import os, json\nos.environ['TVM_NUM_THREADS'] = '{threads}'\nimport sys\nsys.path.insert(0, {str(work)!r})\n"
        "from neox_mlc.runtime import ModelRuntime\nfrom neox_mlc.evaluate import speed\n"
        f"rt = ModelRuntime({str(lib)!r}, {str(qdir / 'params')!r}, {str(qdir / 'mlc-chat-config.json')!r})\n"
        f"print(json.dumps(speed(rt, {prompt}, {decode})))"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-size", action="store_true", help="LINE's 3.6B shape (~7.2 GB checkpoint, ~15 min on 2 cores)")
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--workdir", default="/tmp/neox-mlc-bench-line", help="scratch directory (new or empty; one made by an earlier run is removed and rewritten)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("-o", "--output", default="benchmarks/bench_line.json")
    a = ap.parse_args(argv)
    if a.full_size:
        s = LINE_SHAPE
        shape = {"hidden": s["hidden_size"], "layers": s["num_hidden_layers"], "heads": s["num_attention_heads"],
                 "inter": s["intermediate_size"], "max_pos": s["max_position_embeddings"], "vocab": s["vocab_size"]}
    else:
        shape = {"hidden": a.hidden_size, "layers": a.num_layers, "heads": max(1, a.hidden_size // 96), "inter": 4 * a.hidden_size,
                 "max_pos": 2048, "vocab": 51200}
    work = Path(a.workdir).resolve()
    result: dict[str, Any] = {"machine": machine(), "shape": shape, "quantization": QUANT, "targets": ["iphone", "llvm"], "max_seq_len": 768}
    result.update(prepare(work, shape))
    wall, rules = run_workflow(work, a.cores)
    result["workflow_wall_s"] = round(wall, 1)
    result["per_rule"] = rules
    result["snakemake_benchmark_files"] = snakemake_benchmarks(work)
    dist = work / "dist" / f"{MODEL}-{QUANT}"
    result["bundle_bytes"] = dir_bytes(dist)
    result["bundle_params_bytes"] = dir_bytes(dist / "bundle" / f"{MODEL}-{QUANT}")
    result["bundle_libs"] = {p.name: p.stat().st_size for p in sorted((dist / "lib").iterdir())}
    result["host_speed"] = host_speed(work, a.prompt, a.decode, a.cores)
    write_result(a.output, result)
    if not a.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    run_cli(main)
