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


OUTPUT_MARK = ".neox-mlc-output"
# Files a directory output may hold besides what its step recorded (Snakemake stamps directory outputs).
_TOLERATED = frozenset({OUTPUT_MARK, ".snakemake_timestamp"})


def check_apart(output: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse an output that is, lies inside, or contains one of the step's inputs.

    Why: publishing an output replaces what is at its path, so ``-o MODEL_DIR`` or ``-o .`` would
    otherwise delete the checkpoint being converted or the user's working directory.
    """
    out = Path(output).resolve()
    for item in inputs:
        src = Path(item).resolve()
        if out == src:
            raise WorkflowError(f"output {output} is the input {item}; choose a separate output path")
        if src in out.parents:
            raise WorkflowError(f"output {output} lies inside the input {item}; choose a path outside it")
        if out in src.parents:
            raise WorkflowError(f"output {output} contains the input {item}; choose a separate output path")


def _recorded_files(folder: Path) -> set[str] | None:
    """The files a step recorded when it published ``folder``, or None if no step of ours made it."""
    try:
        mark = json.loads((folder / OUTPUT_MARK).read_text(encoding="utf-8"))
        return {str(f) for f in mark["files"]} | {OUTPUT_MARK}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _step_of(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / OUTPUT_MARK).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_replaceable(target: str | os.PathLike[str], step: str | None) -> None:
    """Refuse to publish over anything this step did not make itself.

    A file output may replace a file (``-o FILE`` means that). A folder output (``step`` given) may
    replace an empty folder, or one whose marker says the same step wrote it and that holds nothing
    else; anything else at the path belongs to the user and is refused with one line.
    """
    path = Path(target)
    if not os.path.lexists(path):
        return
    if step is None:
        if path.is_dir():
            raise WorkflowError(f"output {target} is a folder; expected a file path")
        return
    if path.is_symlink() or not path.is_dir():
        raise WorkflowError(f"output {target} exists and is not a folder; refusing to replace it (give a new or empty folder)")
    entries = {str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir()}
    if not entries:
        return
    recorded = _recorded_files(path)
    made_by = _step_of(path)
    if recorded is None or made_by != step:
        why = "was not written by this step" if recorded is None else f"was written by {made_by}, not {step}"
        raise WorkflowError(f"output folder {target} is not empty and {why}; refusing to replace it (give a new or empty folder)")
    foreign = sorted(entries - recorded - _TOLERATED)
    if foreign:
        raise WorkflowError(
            f"output folder {target} holds {foreign[0]} ({len(foreign)} file(s)) that {step} did not write; "
            "refusing to replace it (move them away or give a new folder)"
        )


def check_output(
    target: str | os.PathLike[str], step: str | None = None, inputs: Sequence[str | os.PathLike[str]] = ()
) -> None:
    """Both refusals of :func:`atomic_path`, for a step to run before its long work starts."""
    check_apart(target, inputs)
    check_replaceable(target, step)


@contextlib.contextmanager
def atomic_path(
    target: str | os.PathLike[str], step: str | None = None, inputs: Sequence[str | os.PathLike[str]] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``target`` only if the block succeeds.

    Files: give no ``step``. Folders: ``step`` names the step making it; the published folder gets a
    marker (``.neox-mlc-output``: step and file list) so a rerun of that step may replace it, while a
    folder the user made, or one holding files the step did not write, is refused before any work
    (and checked again just before the swap). ``inputs`` are refused as or around the output. The
    temp name sits in the same directory so the final ``os.replace`` is atomic on one filesystem;
    on failure the temp is removed and the old output is untouched.
    """
    target = Path(os.path.abspath(target))
    check_apart(target, inputs)
    check_replaceable(target, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.rmdir()
    try:
        yield tmp
        if step is not None:
            if not tmp.is_dir():
                raise WorkflowError(f"step {step} produced no folder for {target}")
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if not p.is_dir())
            (tmp / OUTPUT_MARK).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n", encoding="utf-8")
        check_replaceable(target, step)
        _publish(tmp, target)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            tmp.unlink()
        raise


def _publish(tmp: Path, target: Path) -> None:
    """Swap ``tmp`` in: an old folder output is first renamed aside, so no moment lacks one."""
    if target.is_dir() and not target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / "x")
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


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
