"""``verify``: check a bundle (MANIFEST.json sha256) or a params folder (tensor-cache.json md5) on its own.

Why: a flipped byte in a params shard does not stop TVM from loading it; the model then answers
nonsense (or NaN) without a word. The runner calls the same checks before it loads anything, so a
corrupted bundle is refused with one line naming the file, instead of being run.

Cost: hashing is the whole cost, so files are hashed in parallel on every CPU this process may use
(``hashlib`` releases the GIL). A bundle is checked against MANIFEST.json's sha256 (with SHA-NI,
sha256 runs at about twice md5's speed); a bare params folder against tensor-cache.json's md5
(the only digest MLC's format records). Measured numbers: docs/benchmarks/verify.json.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neox_mlc.common import OUTPUT_MARK, WorkflowError, file_digest, read_json, usable_cpus
from neox_mlc.tensor_cache import verify_cache

MANIFEST = "MANIFEST.json"
# Files a bundle folder may hold that MANIFEST.json does not list: itself, this project's output
# marker, and the stamp Snakemake puts into directory outputs.
_UNLISTED = frozenset({MANIFEST, OUTPUT_MARK, ".snakemake_timestamp"})


def _digests(paths: list[Path], algorithm: str) -> list[str]:
    """Hash files on a thread pool as wide as the CPUs this process may use."""
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(len(paths), usable_cpus())) as pool:
        return list(pool.map(lambda p: file_digest(p, algorithm), paths))


def verify_params(params_dir: str | Path) -> dict[str, Any]:
    """Every shard of ``params_dir`` has the size and md5 tensor-cache.json records; return the index."""
    params_dir = Path(params_dir)
    index = verify_cache(params_dir)
    shards = index.get("records", [])
    missing = [s["dataPath"] for s in shards if not s.get("md5sum")]
    if missing:
        raise WorkflowError(f"params index {params_dir / 'tensor-cache.json'} records no md5sum for {missing[0]}; cannot verify it")
    paths = [params_dir / s["dataPath"] for s in shards]
    for shard, path, digest in zip(shards, paths, _digests(paths, "md5"), strict=True):
        if digest != shard["md5sum"]:
            raise WorkflowError(
                f"params shard {path} is corrupt: md5 {digest}, tensor-cache.json records {shard['md5sum']}"
            )
    return index


def verify_bundle(bundle: str | Path) -> dict[str, Any]:
    """Every file MANIFEST.json lists is present with its size and sha256, and no other file is; return it."""
    bundle = Path(bundle)
    manifest = read_json(bundle / MANIFEST, "bundle manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise WorkflowError(f"bundle manifest {bundle / MANIFEST} lists no files")
    listed = sorted(files)
    for rel in listed:
        path = bundle / rel
        rec = files[rel]
        if not isinstance(rec, dict) or not isinstance(rec.get("size"), int) or not isinstance(rec.get("sha256"), str):
            raise WorkflowError(f"bundle manifest {bundle / MANIFEST}: entry {rel} lacks size or sha256")
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise WorkflowError(f"bundle manifest {bundle / MANIFEST} lists a path outside the bundle: {rel}")
        if not path.is_file():
            raise WorkflowError(f"bundle file {path} listed in MANIFEST.json is missing")
        if path.stat().st_size != files[rel]["size"]:
            raise WorkflowError(f"bundle file {path} has {path.stat().st_size} bytes, MANIFEST.json records {files[rel]['size']}")
    present = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    extra = sorted(f for f in present - set(listed) if Path(f).name not in _UNLISTED)
    if extra:
        raise WorkflowError(f"bundle file {bundle / extra[0]} is not in MANIFEST.json ({len(extra)} unlisted file(s))")
    for rel, digest in zip(listed, _digests([bundle / r for r in listed], "sha256"), strict=True):
        if digest != files[rel]["sha256"]:
            raise WorkflowError(f"bundle file {bundle / rel} is corrupt: sha256 {digest}, MANIFEST.json records {files[rel]['sha256']}")
    return manifest


def verify(path: str | Path) -> str:
    """Verify a bundle folder (MANIFEST.json) or a params folder (tensor-cache.json); say what was checked."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        manifest = verify_bundle(path)
        return f"bundle {path}: {len(manifest['files'])} files match MANIFEST.json (size and sha256)"
    if (path / "tensor-cache.json").is_file():
        index = verify_params(path)
        return f"params {path}: {len(index.get('records', []))} shard(s) match tensor-cache.json (size and md5)"
    raise WorkflowError(f"{path} is neither a bundle (no {MANIFEST}) nor a params folder (no tensor-cache.json)")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="dist/<model>-<quant> bundle, or a params folder with tensor-cache.json")
    a = ap.parse_args(argv)
    print(verify(a.path))
    return 0
