"""Fetch a Hugging Face snapshot at a pinned revision, or take a local checkpoint directory.

Why: the workflow's first artifact must be reproducible and verifiable. ``snapshot_download`` is
called with the configured revision and ``allow_patterns`` that prefer safetensors (PyTorch pickles
are fetched only when a repo has no safetensors); a local path is checked for what later steps need
(config.json, weights, a tokenizer) before any long work starts. Either way the result lands in
``resources/models/<model>/`` with ``snapshot.json`` recording source, resolved revision and each
file's size and sha256 — the provenance the bundle's MANIFEST quotes. Tokens (``HF_TOKEN``) are used
by huggingface_hub from the environment and never written anywhere.

With ``HF_HUB_OFFLINE=1`` nothing is asked of the Hub: the snapshot comes from the local Hugging Face
cache (``HF_HUB_CACHE``/``HF_HOME``), and a revision that is not cached is a one-line error. With
``--config-only`` just ``config.json`` is fetched (one small file), so that the workflow can check
``max_seq_len`` against the model before gigabytes move.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neox_mlc.common import (
    OUTPUT_MARK,
    WorkflowError,
    atomic_path,
    check_free_space,
    check_output,
    read_json,
    run_cli,
    sha256_file,
    write_json,
)
from neox_mlc.hf_checkpoint import arch_from_config, load_arch

CONFIG_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "spiece.model", "*.model", "vocab.*", "merges.txt", "added_tokens.json"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "sentencepiece.bpe.model")


def check_checkpoint(model_dir: Path) -> None:
    """Fail early, naming the directory, if config, weights or tokenizer are missing."""
    if not (model_dir / "config.json").is_file():
        raise WorkflowError(f"model directory {model_dir} has no config.json")
    load_arch(model_dir)
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("pytorch_model*.bin")):
        raise WorkflowError(f"model directory {model_dir} has no weights (*.safetensors or pytorch_model*.bin)")
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise WorkflowError(f"model directory {model_dir} has no tokenizer (one of {', '.join(TOKENIZER_FILES)})")


def _link_or_copy(src: Path, dst: Path) -> None:
    src = Path(os.path.realpath(src))  # the HF cache's snapshot files are symlinks into blobs/
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def allow_patterns(repo_files: list[str]) -> list[str]:
    """Safetensors when the repo has them; PyTorch .bin shards only otherwise."""
    weights = ["*.safetensors", "*.safetensors.index.json"]
    if not any(f.endswith(".safetensors") for f in repo_files):
        weights = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
    return CONFIG_PATTERNS + weights


def download(repo: str, revision: str, dest: Path) -> str:
    """Download into ``dest``; returns the resolved commit sha."""
    import fnmatch

    from huggingface_hub import HfApi, snapshot_download

    from neox_mlc.hub import configure_hub, hub_call

    timeout = configure_hub()
    what = f"model info of {repo}@{revision}"
    info = hub_call(lambda: HfApi().model_info(repo, revision=revision, files_metadata=True, timeout=timeout), what, timeout)
    siblings = info.siblings or []
    patterns = allow_patterns([s.rfilename for s in siblings])
    need = sum(s.size or 0 for s in siblings if any(fnmatch.fnmatch(s.rfilename, p) for p in patterns))
    check_free_space(dest.parent, need, f"the {repo} snapshot")
    hub_call(
        lambda: snapshot_download(repo_id=repo, revision=info.sha, local_dir=dest, allow_patterns=patterns, etag_timeout=timeout),
        f"download of {repo}@{info.sha}", timeout, attempts=1,  # file downloads retry and resume by themselves
    )
    return str(info.sha)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _not_cached(repo: str, revision: str, what: str) -> WorkflowError:
    from huggingface_hub import constants

    return WorkflowError(
        f"HF_HUB_OFFLINE=1 and {what} of {repo}@{revision} is not in the Hugging Face cache {constants.HF_HUB_CACHE}; "
        "download it once with network access, or set local_path to a checkpoint directory"
    )


def from_cache(repo: str, revision: str, dest: Path) -> str:
    """Offline: link the cached snapshot's files into ``dest``; returns its commit sha."""
    import fnmatch

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=repo, revision=revision))
    except LocalEntryNotFoundError:
        raise _not_cached(repo, revision, "the snapshot") from None
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    patterns = allow_patterns(files)
    for rel in files:
        if "/" not in rel and any(fnmatch.fnmatch(rel, pat) for pat in patterns):
            _link_or_copy(folder / rel, dest / rel)
    return folder.name


def fetch_config(out_file: Path, repo: str | None, revision: str, local_path: Path | None) -> None:
    """Fetch ``config.json`` alone (and check its architecture): the first, small step of a fetch."""
    with atomic_path(out_file) as tmp:
        if local_path is not None:
            if not (local_path / "config.json").is_file():
                raise WorkflowError(f"model directory {local_path} has no config.json")
            shutil.copyfile(local_path / "config.json", tmp)
        else:
            if not repo:
                raise WorkflowError("model has neither hf_repo nor local_path")
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import LocalEntryNotFoundError

            from neox_mlc.hub import configure_hub, hub_call

            if hub_offline():
                try:
                    shutil.copyfile(hf_hub_download(repo, "config.json", revision=revision), tmp)
                except LocalEntryNotFoundError:
                    raise _not_cached(repo, revision, "config.json") from None
            else:
                # online: the same timeouts and bounded retries as every other hub request
                timeout = configure_hub()
                path = hub_call(
                    lambda: hf_hub_download(repo, "config.json", revision=revision, etag_timeout=timeout),
                    f"config.json of {repo}@{revision}", timeout,
                )
                shutil.copyfile(path, tmp)
        arch_from_config(read_json(tmp, "model config.json"), f"{repo or local_path}: config.json")


def fetch(out_dir: Path, repo: str | None, revision: str, local_path: Path | None) -> dict[str, Any]:
    """Materialise the snapshot atomically and return its provenance record."""
    inputs = [local_path] if local_path is not None else []
    check_output(out_dir, "fetch_model", inputs)
    with atomic_path(out_dir, "fetch_model", inputs) as tmp:
        tmp.mkdir(parents=True)
        if local_path is not None:
            check_checkpoint(local_path)
            for item in sorted(local_path.iterdir()):
                if item.is_file() and item.name != OUTPUT_MARK:
                    _link_or_copy(item, tmp / item.name)
            source, resolved = str(local_path), revision
        else:
            if not repo:
                raise WorkflowError("model has neither hf_repo nor local_path")
            resolved = from_cache(repo, revision, tmp) if hub_offline() else download(repo, revision, tmp)
            shutil.rmtree(tmp / ".cache", ignore_errors=True)
            check_checkpoint(tmp)
            source = f"hf://{repo}"
        files = {
            p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        record = {"source": source, "revision": revision, "resolved_revision": resolved, "files": files}
        write_json(tmp / "snapshot.json", record)
    return record


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-repo")
    src.add_argument("--local-path")
    ap.add_argument("--revision", default="main")
    ap.add_argument("--config-only", action="store_true", help="fetch config.json alone; -o names the file")
    ap.add_argument("-o", "--output", required=True)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    local = Path(a.local_path) if a.local_path else None
    if local is not None and not local.is_dir():
        raise WorkflowError(f"local model path {local} is not a directory")
    if a.config_only:
        fetch_config(Path(a.output), a.hf_repo, a.revision, local)
    else:
        fetch(Path(a.output), a.hf_repo, a.revision, local)
    return 0


if __name__ == "__main__":
    run_cli(main)
