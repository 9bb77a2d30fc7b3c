"""Small shared helpers: one error type, one CLI wrapper, atomic writes.

Why: every step must fail with *one* line naming the bad value and what is allowed (exit code 2),
and must never leave a half-written file that a rerun would trust. Keeping both mechanisms here
means each script gets them by calling two functions instead of re-implementing them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


class WorkflowError(Exception):
    """A user-facing error: its message is printed as one line, the process exits with 2."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run ``main`` and turn a :class:`WorkflowError` into one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except WorkflowError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``target`` only if the block succeeds.

    Works for files and directories. The temp name sits in the same directory so the final
    ``os.replace`` is atomic on one filesystem; on failure the temp is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.rmdir()
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def usable_cpus() -> int:
    """CPUs this process may run on: a Slurm job's allotment, not the node's count.

    Why: thread pools sized by ``os.cpu_count()`` oversubscribe a job that was given 2 of 64 CPUs,
    and TVM's spinning workers then slow decode by orders of magnitude.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    """Write JSON atomically (UTF-8, non-ASCII kept readable, trailing newline)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Read JSON, turning a missing or malformed file into a one-line error naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise WorkflowError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise WorkflowError(f"{what} is not valid JSON: {path} ({err.msg} at line {err.lineno})") from None


def file_digest(path: str | os.PathLike[str], algorithm: str, chunk: int = 1 << 22) -> str:
    """Stream a file through a hash (files here can be several GB)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 as MANIFEST.json and snapshot.json record it."""
    return file_digest(path, "sha256")


def md5_file(path: str | os.PathLike[str]) -> str:
    """md5 as MLC's tensor cache records it per shard."""
    return file_digest(path, "md5")


def check_free_space(directory: str | os.PathLike[str], need_bytes: int, what: str) -> None:
    """Stop before writing if ``directory``'s filesystem cannot hold ``need_bytes`` (+5 %, +64 MiB).

    Why: a 7 GB download or conversion that dies on a full disk wastes an hour and can leave the
    disk full for everything else; checking first costs nothing.
    """
    target = Path(directory)
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(need_bytes * 1.05) + (64 << 20)
    if free < need:
        raise WorkflowError(
            f"not enough disk space for {what} in {target}: need {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )


def run_mlc_llm(argv: list[str]) -> None:
    """Run the real MLC-LLM CLI (``backend: mlc_llm``), or stop naming the missing tool."""
    import subprocess

    if shutil.which(argv[0]) is None:
        raise WorkflowError("backend mlc_llm selected but the mlc_llm CLI is not installed (install MLC-LLM or use backend: native)")
    subprocess.run(argv, check=True)
