"""Checks on the merged workflow config that a JSON schema cannot express, run at planning time.

Why: a bad value must stop the run before any job starts, with one line naming the value and what
is allowed. The schema (config/config.schema.yaml) bounds types and shapes; this module checks names
against the registries (quantizations, targets, templates) and ``max_seq_len`` against the model's
``max_position_embeddings`` whenever that is knowable without a download.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from neox_mlc.common import WorkflowError
from neox_mlc.hf_checkpoint import load_arch
from neox_mlc.layout import TARGETS, UNBUILDABLE, bundle_id, model_config, model_lib, snapshot_dir
from neox_mlc.llamacpp import FTYPES as LLAMA_CPP_TYPES
from neox_mlc.neox_config import MAX_PREFILL_CHUNK, check_context_window
from neox_mlc.package_config import match_package_config, read_package_config
from neox_mlc.quantization import QUANTIZATIONS
from neox_mlc.templates import validate_template


def model_max_positions(name: str, spec: dict[str, Any], root: Path) -> int | None:
    """``max_position_embeddings`` if known before any job runs (generated, local or fetched)."""
    for made_here in ("generate", "train"):
        if made_here in spec:
            return int(spec[made_here]["max_position_embeddings"])
    candidates = [root / Path(model_config(name)).parent, root / snapshot_dir(name)]
    if "local_path" in spec:
        candidates.insert(0, Path(spec["local_path"]))
    for folder in candidates:
        if (folder / "config.json").is_file():
            # the whole architecture is checked here, so a malformed config.json is named at planning
            return load_arch(folder)[0].max_position_embeddings
    return None


def check_fetched_context_window(config: dict[str, Any], name: str, config_json: Path) -> None:
    """``max_seq_len`` against a model's fetched config.json: runs before its weights are downloaded.

    Why here and not only at planning time: for a Hugging Face model the limit is known only once
    ``config.json`` (one small file) is fetched; the weights' download waits for this check. Prints
    the one line too, since Snakemake reports an input function's error with its own context.
    """
    limit = load_arch(Path(config_json).parent)[0].max_position_embeddings
    try:
        check_context_window(config["max_seq_len"], limit)
    except WorkflowError as err:
        print(f"error: model {name!r}: {err}", file=sys.stderr)
        raise WorkflowError(f"model {name!r}: {err}") from None


def check_config(config: dict[str, Any], root: Path) -> None:
    """Raise :class:`WorkflowError` on the first value that cannot work."""
    for q in config["quantizations"]:
        if q not in QUANTIZATIONS:
            raise WorkflowError(f"unknown quantization {q!r} in config; allowed: {', '.join(QUANTIZATIONS)}")
    for t in config.get("llama_cpp_types", []):
        if t not in LLAMA_CPP_TYPES:
            raise WorkflowError(f"unknown llama_cpp_types entry {t!r} in config; allowed: {', '.join(LLAMA_CPP_TYPES)}")
    for t in [config["target"], *config.get("extra_targets", [])]:
        if t not in TARGETS:
            raise WorkflowError(f"unknown target {t!r} in config; allowed: {', '.join(TARGETS)}")
        if t in UNBUILDABLE:
            buildable = ", ".join(x for x in TARGETS if x not in UNBUILDABLE)
            raise WorkflowError(f"target {t!r} cannot be built here ({UNBUILDABLE[t]}); allowed: {buildable}")
    models = config["models"]
    for name in config["build_models"]:
        if name not in models:
            raise WorkflowError(f"build_models names unknown model {name!r}; configured: {', '.join(models)}")
    templates = config["conv_templates"]
    n = config["max_seq_len"]
    for name, spec in models.items():
        tpl = spec["conv_template"]
        if tpl not in templates:
            raise WorkflowError(f"model {name!r} uses unknown conv_template {tpl!r}; defined: {', '.join(templates)}")
        validate_template(tpl, templates[tpl])
        if "train" in spec and spec["train"]["corpus"] not in config.get("corpora", {}):
            known = ", ".join(config.get("corpora", {})) or "none"
            raise WorkflowError(f"model {name!r} trains on unknown corpus {spec['train']['corpus']!r}; corpora: {known}")
        if "local_path" in spec and not (Path(spec["local_path"]) / "config.json").is_file():
            raise WorkflowError(f"model {name!r}: local_path {spec['local_path']} has no config.json")
        g = spec.get("generate")
        if g and g["hidden_size"] % g["num_heads"]:
            raise WorkflowError(
                f"model {name!r}: generate.hidden_size {g['hidden_size']} is not divisible by num_heads {g['num_heads']}; "
                "allowed: a multiple of num_heads"
            )
        limit = model_max_positions(name, spec, root)
        if limit is not None:
            try:
                check_context_window(n, limit)
            except WorkflowError as err:
                raise WorkflowError(f"model {name!r}: {err}") from None


def download_url(spec: dict[str, Any], model: str, quant: str, bundle_weight: bool) -> str | None:
    """The app's ``model_url`` for one bundle: none when the weights ship inside the app (the default)."""
    if bundle_weight:
        return None
    if not spec.get("model_url"):
        raise WorkflowError(
            f"bundle_weight False (download on device) needs models.{model}.model_url: where "
            f"bundle/{model}-{quant}/ is uploaded, e.g. https://huggingface.co/<you>/{model}-{{quant}}-MLC"
        )
    return spec["model_url"].replace("{quant}", quant)


def plan_app(config: dict[str, Any]) -> list[tuple[str, str]]:
    """The ``(model, quant)`` bundles of ``dist/app``, checked at planning time (one-line errors).

    Without ``package_config``: every model of ``build_models`` × ``quantizations``. With it: the
    entries of that ``mlc-package-config.json``, checked as ``mlc_llm package`` checks them and
    matched to bundles this workflow can build.
    """
    bundle_weight = config.get("bundle_weight", True)
    for m in config["build_models"]:
        for q in config["quantizations"]:
            download_url(config["models"][m], m, q, bundle_weight)
    if not config.get("package_config"):
        return [(m, q) for m in config["build_models"] for q in config["quantizations"]]
    bundles = {bundle_id(m, q): (m, q) for m in config["models"] for q in QUANTIZATIONS}
    n = config["max_seq_len"]
    compiled = {"context_window_size": n, "prefill_chunk_size": min(n, MAX_PREFILL_CHUNK)}
    entries = read_package_config(Path(config["package_config"]))
    return match_package_config(entries, bundles, {k: model_lib(*v) for k, v in bundles.items()}, compiled)


def llama_cpp_rows(config: dict[str, Any]) -> list[str]:
    """The configured ``llama_cpp_types`` when llama-cpp-python is installed, else none (with a warning).

    Why not an error: llama-cpp-python is an optional extra (it compiles llama.cpp for 10-40 min);
    a report made without it keeps every other row, and gains llama.cpp's rows once it is installed.
    """
    from neox_mlc.llamacpp import DEFAULT_PYTHON, llama_python

    types = list(config.get("llama_cpp_types", []))
    if types and llama_python() is None:
        where = os.environ.get("LLAMA_PYTHON", DEFAULT_PYTHON)
        print(f"warning: no llama-cpp-python in {where} (LLAMA_PYTHON): the reports leave out llama.cpp {', '.join(types)}", file=sys.stderr)
        return []
    return types


def put_interpreter_first_on_path() -> None:
    """Jobs run ``python``: make it the interpreter running Snakemake (a conda env, if used, wins).

    Why: a user who starts ``.venv/bin/snakemake`` without activating the venv would otherwise run
    the jobs with whatever ``python`` the shell finds first, lacking the pinned packages.
    """
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + path


def validate_config(config: dict[str, Any], schema_path: Path) -> None:
    """Validate with ``snakemake.utils.validate`` (which also fills defaults); fail with one line.

    Why: Snakemake's own message dumps the whole schema and config; a user needs the one key, the
    bad value and the rule it broke.
    """
    from snakemake.utils import validate

    try:
        validate(config, str(schema_path))
    except Exception:  # noqa: BLE001 - snakemake wraps jsonschema's error in its own type
        raise WorkflowError(schema_error_line(config, schema_path)) from None


def schema_error_line(config: dict[str, Any], schema_path: Path) -> str:
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        return "invalid config (schema validation failed)"
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    message = " ".join(str(error.message).split())
    if len(message) > 300:
        message = message[:297] + "..."
    return f"invalid config at {where}: {message}"


def stop_on_bad_config(check: Any, *args: Any) -> Any:
    """Run a planning-time check (returning what it returns); on a :class:`WorkflowError` print one line and exit 2.

    Why not raise: Snakemake would print the message with a traceback of the Snakefile; a bad
    value deserves one line and no job started.
    """
    try:
        return check(*args)
    except WorkflowError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


_ERROR_BLOCK = re.compile(r"^Error in rule (?P<rule>\S+):\s*$")
_TRACEBACK = "Traceback (most recent call last):"


def failed_job_logs(snakemake_log: str) -> list[tuple[str, str, list[str]]]:
    """``(rule, wildcards, job logs)`` of every "Error in rule" block of Snakemake's own log."""
    out: list[tuple[str, str, list[str]]] = []
    current: list[Any] | None = None
    for line in snakemake_log.splitlines():
        match = _ERROR_BLOCK.match(line)
        if match:
            current = [match.group("rule"), "", []]
            out.append(current)  # type: ignore[arg-type]
            continue
        if current is None:
            continue
        if not line.startswith("    "):
            current = None
            continue
        key, _, value = line.strip().partition(": ")
        if key == "wildcards":
            current[1] = value
        elif key == "log":
            logs = value.split(" (check log file")[0]
            current[2] = [p.strip() for p in logs.split(",") if p.strip()]
    return [(r, w, logs) for r, w, logs in out]


def cause_line(log_text: str) -> str | None:
    """The line of a job's log that says why it failed: our one-line ``error:``, else a traceback's last line."""
    lines = [ln.rstrip() for ln in log_text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if errors:
        return errors[-1].removeprefix("error: ")
    if _TRACEBACK in lines:
        tail = lines[len(lines) - 1 - lines[::-1].index(_TRACEBACK) :]
        unindented = [ln for ln in tail[1:] if not ln.startswith(" ")]
        if unindented:
            return unindented[-1]
    return lines[-1] if lines else None


def report_failed_jobs(log: Any, stream: Any = None) -> None:
    """``onerror``: print one line per failed job, naming the rule and the cause from its log.

    Why: Snakemake's error block only points at the job's log file; the user should read the cause
    (e.g. "name resolution failed", "tensor X has shape ...") on the console without opening it.
    """
    stream = stream or sys.stderr
    paths = [log] if isinstance(log, (str, os.PathLike)) else list(log or [])
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for rule, wildcards, logs in failed_job_logs(text):
            causes = []
            for job_log in logs:
                try:
                    cause = cause_line(Path(job_log).read_text(encoding="utf-8", errors="replace"))
                except OSError:
                    continue
                if cause:
                    causes.append(f"{cause[:400]} (log: {job_log})")
            where = f"rule {rule}" + (f" ({wildcards})" if wildcards else "")
            print(f"error: {where}: {causes[-1] if causes else 'failed; its log has no error line'}", file=stream)
