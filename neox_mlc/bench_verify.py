"""Benchmark: what verifying a 2 GB bundle costs (MANIFEST sha256, tensor-cache md5; 1 thread vs all CPUs).

Why: the runner verifies every bundle before loading it, so the check must stay at seconds for a
phone-sized bundle (~2 GB of q4f16 params). The bundle here is synthetic (random shard bytes of
MLC's 32 MB shard size, with a real tensor-cache.json and MANIFEST.json); hashing cost does not
depend on the bytes. Timed with the files in the page cache (as right after packaging or a first
load); a cold read adds the disk's read time on top.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neox_mlc.benchtools import write_result
from neox_mlc.common import usable_cpus
from neox_mlc.verify import _digests, verify_bundle, verify_params

SHARD_BYTES = 32 << 20


def make_bundle(root: Path, total_bytes: int) -> Path:
    """A bundle folder whose params are ``total_bytes`` of random shards, with index and manifest."""
    params = root / "bundle" / "m"
    params.mkdir(parents=True, exist_ok=True)
    records, files = [], {}
    for i in range(-(-total_bytes // SHARD_BYTES)):
        data = os.urandom(min(SHARD_BYTES, total_bytes - i * SHARD_BYTES))
        name = f"params_shard_{i}.bin"
        (params / name).write_bytes(data)
        records.append({"dataPath": name, "format": "raw-shard", "nbytes": len(data), "records": [], "md5sum": hashlib.md5(data).hexdigest()})
        files[f"bundle/m/{name}"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    index = json.dumps({"metadata": {}, "records": records}).encode()
    (params / "tensor-cache.json").write_bytes(index)
    files["bundle/m/tensor-cache.json"] = {"size": len(index), "sha256": hashlib.sha256(index).hexdigest()}
    (root / "MANIFEST.json").write_text(json.dumps({"files": files}))
    return root


def _timed(fn: Any, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="benchmarks/verify-work", help="scratch directory (needs --gb of disk)")
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("-o", "--output", default="benchmarks/verify.json")
    a = ap.parse_args(argv)
    total = int(a.gb * 1e9)
    work = Path(a.work)
    bundle = work if (work / "MANIFEST.json").is_file() else make_bundle(work, total)
    shards = sorted((bundle / "bundle" / "m").glob("params_shard_*.bin"))
    result = {
        "bundle_bytes": total,
        "shards": len(shards),
        "cpu": cpu_name(),
        "usable_cpus": usable_cpus(),
        "page_cache": "warm",
        "load_average_1min_before": os.getloadavg()[0],  # a shared machine's other work slows hashing
        "seconds": {
            "verify_bundle (MANIFEST sha256, all CPUs)": _timed(lambda: verify_bundle(bundle)),
            "verify_params (tensor-cache md5, all CPUs)": _timed(lambda: verify_params(bundle / "bundle" / "m")),
            "sha256, 1 thread": _timed(lambda: [_digests([p], "sha256") for p in shards], 1),
            "md5, 1 thread": _timed(lambda: [_digests([p], "md5") for p in shards], 1),
        },
    }
    write_result(a.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
