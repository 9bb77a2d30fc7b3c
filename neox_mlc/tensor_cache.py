"""MLC's tensor-cache format (``tensor-cache.json`` + ``params_shard_*.bin``), written streaming.

Why our own writer rather than ``tvm.contrib.tvmjs.dump_tensor_cache``: TVM's writer decides the
shard layout only while it writes, so a workflow cannot know its output files in advance, and it writes
straight into the final directory (an interrupted run leaves an index next to short shards). Here the
layout is planned first from tensor sizes alone — with exactly TVM's rule, so the files are
byte-identical — which lets each shard be written (atomically) by its own job, and the index is
written last, only after every shard is verified. Reading back goes through TVM's own loader in the
tests (``tvm.contrib.tvmjs.load_tensor_cache``), which is the proof that the format is right.

Format facts (also visible in the MLC reference fixtures): every record carries the cache's
``format`` ("f32-to-bf16"); float32 tensors are stored as bfloat16 (round to nearest even, values
beyond bfloat16's finite range truncated), other dtypes raw; ``tensor-cache-b16.json`` repeats the
index with float32 records relabelled ``bfloat16`` / ``raw``. Shards are filled in order; a tensor
that does not fit starts a new shard, and one of at least half the cap goes into a shard of its own
at once (TVM's "out-of-band" rule).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neox_mlc.common import WorkflowError, atomic_path, md5_file

ENCODE_FORMAT = "f32-to-bf16"
DEFAULT_SHARD_CAP_MB = 32
_BF16_LIMIT = np.array([np.finfo(np.float32).max], dtype=np.float32).view(np.uint32)[0] >> 16 << 16


def f32_to_bf16(value: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits (nearest even); out-of-range values are truncated."""
    bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
    limit = np.array([_BF16_LIMIT], dtype=np.uint32).view(np.float32)[0]
    in_range = (value < limit) & (value > -limit)
    bias = np.where(in_range, ((bits >> 16) & 1) + np.uint32(0x7FFF), np.uint32(0)).astype(np.uint32)
    return ((bits + bias) >> 16).astype(np.uint16)


def bf16_to_f32(value: np.ndarray) -> np.ndarray:
    return (value.astype(np.uint32) << 16).view(np.float32)


def stored_nbytes(shape: tuple[int, ...] | list[int], dtype: str) -> int:
    """Bytes a tensor takes in a shard (float32 shrinks to bfloat16)."""
    count = int(np.prod(shape)) if len(shape) else 1
    return count * (2 if dtype == "float32" else np.dtype(dtype).itemsize)


def encode(value: np.ndarray) -> memoryview:
    """The bytes a tensor occupies in a shard (a view: no copy for non-float32 tensors)."""
    if value.dtype == np.float32:
        value = f32_to_bf16(value)
    return memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8))


@dataclass
class ShardPlan:
    """One shard: its file name and the tensors in it, in order, with offsets."""

    data_path: str
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(r["nbytes"] for r in self.records)


def plan_shards(
    entries: list[tuple[str, list[int], str]], shard_cap_mb: int = DEFAULT_SHARD_CAP_MB
) -> list[ShardPlan]:
    """Assign ``(name, shape, dtype)`` entries to shards exactly as TVM's writer would."""
    cap = shard_cap_mb * (1 << 20)
    shards: list[ShardPlan] = []
    pending: list[dict[str, Any]] = []
    pending_bytes = 0

    def commit(records: list[dict[str, Any]]) -> None:
        shards.append(ShardPlan(f"params_shard_{len(shards)}.bin", records))

    for name, shape, dtype in entries:
        nbytes = stored_nbytes(shape, dtype)
        rec = {"name": name, "shape": list(shape), "dtype": dtype, "format": ENCODE_FORMAT, "nbytes": nbytes}
        if pending_bytes + nbytes >= cap:
            if nbytes * 2 >= cap:
                rec["byteOffset"] = 0
                commit([rec])
                continue
            if pending:
                commit(pending)
            pending, pending_bytes = [], 0
        rec["byteOffset"] = pending_bytes
        pending.append(rec)
        pending_bytes += nbytes
    if pending:
        commit(pending)
    return shards


def _md5(chunks: list[memoryview]) -> str:
    digest = hashlib.md5()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def write_shard(path: str | os.PathLike[str], chunks: list[memoryview], expected: int) -> str:
    """Write one shard atomically, check its size against the plan; return its md5.

    The digest is taken from the bytes in memory, on a second thread while the file is written
    (both release the GIL), so the index never reads the shard back and hashing costs no wall time.
    """
    total = sum(c.nbytes for c in chunks)
    if total != expected:
        raise WorkflowError(f"shard {path}: produced {total} bytes, plan says {expected}")
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(_md5, chunks)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
        return digest.result()


def write_index(
    out_dir: str | os.PathLike[str], shards: list[ShardPlan], metadata: dict[str, Any], md5s: dict[str, str] | None = None
) -> None:
    """Verify every shard on disk, then write ``tensor-cache.json`` (and the b16 variant) atomically.

    ``md5s`` (data path → digest) comes from :func:`write_shard` when the same process wrote the
    shards; otherwise each shard is hashed from disk.
    """
    out_dir = Path(out_dir)
    records = []
    for shard in shards:
        path = out_dir / shard.data_path
        if not path.is_file():
            raise WorkflowError(f"shard {path} is missing; cannot write the index")
        size = path.stat().st_size
        if size != shard.nbytes:
            raise WorkflowError(f"shard {path} has {size} bytes, expected {shard.nbytes}")
        records.append(
            {
                "dataPath": shard.data_path,
                "format": "raw-shard",
                "nbytes": shard.nbytes,
                "records": shard.records,
                "md5sum": (md5s or {}).get(shard.data_path) or md5_file(path),
            }
        )
    _dump(out_dir / "tensor-cache.json", {"metadata": metadata, "records": records})
    if any(r["dtype"] == "float32" for s in shards for r in s.records):
        b16 = copy.deepcopy(records)
        for shard in b16:
            for rec in shard["records"]:
                if rec["dtype"] == "float32":
                    rec["format"], rec["dtype"] = "raw", "bfloat16"
        _dump(out_dir / "tensor-cache-b16.json", {"metadata": metadata, "records": b16})


def _dump(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=4))


def verify_cache(cache_dir: str | os.PathLike[str], check_md5: bool = False) -> dict[str, Any]:
    """Check that an index points only at complete shards; return the parsed index."""
    cache_dir = Path(cache_dir)
    index_path = cache_dir / "tensor-cache.json"
    if not index_path.is_file():
        raise WorkflowError(f"params index not found: {index_path}")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError:
        raise WorkflowError(f"params index {index_path} is corrupt (not JSON)") from None
    for shard in index.get("records", []):
        path = cache_dir / shard["dataPath"]
        if not path.is_file() or path.stat().st_size != shard["nbytes"]:
            raise WorkflowError(f"params shard {path} is missing or truncated (expected {shard['nbytes']} bytes)")
        if check_md5 and md5_file(path) != shard.get("md5sum"):
            raise WorkflowError(f"params shard {path} fails its md5 check")
    return index


def load_numpy(cache_dir: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a cache back to numpy (float32 records widened from bfloat16), for tests and evaluation."""
    cache_dir = Path(cache_dir)
    index = verify_cache(cache_dir)
    out: dict[str, np.ndarray] = {}
    for shard in index["records"]:
        raw = (cache_dir / shard["dataPath"]).read_bytes()
        for rec in shard["records"]:
            buf = raw[rec["byteOffset"] : rec["byteOffset"] + rec["nbytes"]]
            if rec["dtype"] == "float32" and rec["format"] == ENCODE_FORMAT:
                arr = bf16_to_f32(np.frombuffer(buf, dtype=np.uint16))
            else:
                arr = np.frombuffer(buf, dtype=rec["dtype"])
            out[rec["name"]] = arr.reshape(rec["shape"])
    return out
