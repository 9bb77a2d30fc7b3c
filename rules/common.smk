# Input functions, wildcard constraints and config checks shared by every rule.

import json
import re
import shlex
from pathlib import Path

import os

from neox_mlc import layout
from neox_mlc.codedeps import code_inputs
from neox_mlc.llamacpp import FTYPES as LLAMA_CPP_TYPES
from neox_mlc.quantization import GGUF_PEER_TYPES, QUANTIZATIONS
from neox_mlc.workflow_config import (
    check_config,
    download_url,
    plan_app,
    check_fetched_context_window,
    llama_cpp_rows,
    put_interpreter_first_on_path,
    stop_on_bad_config,
)

put_interpreter_first_on_path()

stop_on_bad_config(check_config, config, Path(workflow.basedir))

MODELS = config["models"]
CORPORA = config.get("corpora", {})
GENERATED_MODELS = [m for m, spec in MODELS.items() if "generate" in spec]
TRAINED_MODELS = [m for m, spec in MODELS.items() if "train" in spec]
BACKEND = config.get("backend", "native")
HOST_CPU = config.get("host_cpu", "auto")
LLAMA_CPP_ROWS = llama_cpp_rows(config)


def code(entry):
    """The entry script ``scripts/<entry>.py`` and the library modules it imports: a rule's code.

    Changing any of them reruns exactly the artifacts that step makes (Snakemake compares small
    inputs by checksum, not only mtime); the list is derived from the imports, never kept by hand.
    """
    return code_inputs(workflow.basedir, f"scripts/{entry}.py")


TARGETS_BUILT = [config["target"], *config.get("extra_targets", [])]


def _alternation(names):
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


wildcard_constraints:
    model=_alternation(MODELS),
    quant=_alternation(QUANTIZATIONS),
    target=_alternation(layout.TARGETS),
    shard=r"\d+",
    gtype="|".join(GGUF_PEER_TYPES),
    ltype=_alternation(LLAMA_CPP_TYPES),
    corpus=_alternation(CORPORA) if CORPORA else "(?!x)x",


def all_bundles():
    return [
        layout.dist_dir(m, q)
        for m in config["build_models"]
        for q in config["quantizations"]
    ]


def all_targets(wildcards):
    """Every bundle, plus every shard of its tensor cache once its plan exists.

    Snakemake treats a missing intermediate file as harmless when the files asked for are up to
    date, so the shards are asked for explicitly: deleting one reruns its conversion job and what
    depends on it (index, app config, bundle) instead of being silently ignored. Before a plan
    exists the bundles alone are asked for, so a dry run still shows every job.
    """
    targets = all_bundles() + ([layout.app_dir()] if "iphone" in TARGETS_BUILT else [])
    for m in config["build_models"]:
        for q in config["quantizations"]:
            plan = layout.weight_plan(m, q)
            if os.path.exists(plan):
                targets += planned_shards(plan, m, q)
    return targets


def model_spec(wildcards):
    return MODELS[wildcards.model]


def fetch_source_args(wildcards):
    """Where the snapshot comes from, as CLI flags (a change of source or revision refetches)."""
    spec = model_spec(wildcards)
    if "generate" in spec or "train" in spec:
        src = ["--local-path", layout.generated_dir(wildcards.model)]
    elif "local_path" in spec:
        src = ["--local-path", spec["local_path"]]
    else:
        src = ["--hf-repo", spec["hf_repo"]]
    return shlex.join([*src, "--revision", spec["revision"]])


def checked_model_config(wildcards):
    """The model's config.json (fetched alone by model_config), once max_seq_len is checked against it."""
    path = checkpoints.model_config.get(model=wildcards.model).output.config
    check_fetched_context_window(config, wildcards.model, Path(path))
    return path


def fetch_inputs(wildcards):
    spec = model_spec(wildcards)
    if "generate" in spec:
        d = layout.generated_dir(wildcards.model)
        return [f"{d}/config.json", f"{d}/model.safetensors", f"{d}/tokenizer.json"]
    if "train" in spec:
        d = layout.generated_dir(wildcards.model)
        return [f"{d}/config.json", f"{d}/model.safetensors", f"{d}/spiece.model"]
    return []


def corpus_file(model, split):
    """A trained model's corpus split (``train`` or ``heldout``), made by rule prepare_corpus."""
    return f"resources/corpus/{MODELS[model]['train']['corpus']}/{split}.txt"


def train_args(wildcards):
    """The training spec as CLI flags: a change of any value retrains."""
    spec = {k: v for k, v in model_spec(wildcards)["train"].items() if k != "corpus"}
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(spec.items()))


def generate_args(wildcards):
    g = model_spec(wildcards)["generate"]
    flags = {
        "hidden-size": g["hidden_size"],
        "num-layers": g["num_layers"],
        "num-heads": g["num_heads"],
        "intermediate-size": g["intermediate_size"],
        "vocab-size": g["vocab_size"],
        "max-position-embeddings": g["max_position_embeddings"],
        "rotary-pct": g.get("rotary_pct", 0.25),
        "seed": g["seed"],
        "train-steps": g.get("train_steps", 0),
    }
    return " ".join(f"--{k} {v}" for k, v in flags.items())


def template_json(wildcards):
    """The model's conversation template, serialised: a change reruns gen_config and its dependants."""
    name = model_spec(wildcards)["conv_template"]
    return json.dumps(
        config["conv_templates"][name], ensure_ascii=False, sort_keys=True
    )


def shard_paths(model, quant):
    """Shards named by the conversion plan (known once the weight_plan checkpoint has run)."""
    plan_path = checkpoints.weight_plan.get(model=model, quant=quant).output.plan
    return planned_shards(plan_path, model, quant)


def planned_shards(plan_path, model, quant):
    with open(plan_path) as handle:
        plan = json.load(handle)
    d = layout.params_dir(model, quant)
    return [f"{d}/{s['dataPath']}" for s in plan["shards"]]


def shard_files(wildcards):
    return shard_paths(wildcards.model, wildcards.quant)


def bundle_libs(wildcards):
    return [layout.library(wildcards.model, wildcards.quant, t) for t in TARGETS_BUILT]


# The bundles of dist/app: build_models × quantizations, or the entries of an mlc-package-config.json
# (checked here, before any job, as `mlc_llm package` checks them).
APP_BUNDLES = stop_on_bad_config(plan_app, config)


def app_bundles(wildcards):
    if "iphone" not in TARGETS_BUILT:
        raise WorkflowError(
            f"{layout.app_dir()} links iphone libraries; targets built: {', '.join(TARGETS_BUILT)} "
            "(set --config target=iphone or extra_targets=[iphone])"
        )
    return [layout.dist_dir(m, q) for m, q in APP_BUNDLES]


def app_model_url(wildcards):
    """`--model-url URL` when the weights are downloaded on the device (bundle_weight false), else nothing."""
    url = download_url(
        model_spec(wildcards),
        wildcards.model,
        wildcards.quant,
        config.get("bundle_weight", True),
    )
    return f"--model-url {shlex.quote(url)}" if url else ""


def not_a_bundle():
    """Regex matching any name but a known bundle, so that only unknown ones reach reject_bundle."""
    known = [layout.bundle_id(m, q) for m in MODELS for q in QUANTIZATIONS]
    known.append(Path(layout.app_dir()).name)
    return f"(?!(?:{_alternation(known)})$)[^/]+"


def reject_bundle(wildcards):
    allowed = ", ".join(layout.bundle_id(m, q) for m in MODELS for q in QUANTIZATIONS)
    raise WorkflowError(  # Snakemake's own class: the Snakefile shares snakemake.workflow's namespace
        f"unknown bundle dist/{wildcards.bundle}; allowed: dist/<model>-<quant> with {allowed}"
    )


def eval_text_input(wildcards):
    ev = config.get("evaluation", {})
    return [] if ev.get("hf_dataset") else [ev.get("text", "data/eval_ja.txt")]


def eval_source_args(wildcards):
    ev = config.get("evaluation", {})
    if ev.get("hf_dataset"):
        src = ["--hf-dataset", ev["hf_dataset"], "--split", ev.get("split", "test")]
    else:
        src = ["--text", ev.get("text", "data/eval_ja.txt")]
    prompts = [a for p in ev.get("prompts", []) for a in ("--prompt", p)]
    return shlex.join([*src, "--max-tokens", str(ev.get("max_tokens", 4096)), *prompts])


def training_text(model):
    """The text a model made here was trained on (its unigram baseline's counts), or None."""
    spec = MODELS[model]
    if "train" in spec:
        return corpus_file(model, "train")
    if "generate" in spec:
        return "data/corpus_ja.txt"
    return None


def summary_extras(wildcards):
    """The unigram baseline and training record of a model made here (none for downloaded ones)."""
    m = wildcards.model
    extras = {}
    if training_text(m):
        extras["baseline"] = f"reports/{m}/unigram.json"
    if "train" in MODELS[m]:
        extras["training"] = f"{layout.generated_dir(m)}/training.json"
    return extras


def summary_extra_args(wildcards, input):
    return " ".join(
        f"--{k} {input[k]}" for k in ("baseline", "training") if k in input.keys()
    )


def per_attempt(base):
    """``base`` (a number, or a function of the wildcards) on a job's first attempt, n × on its n-th.

    Why: a job killed on a cluster for memory or time is retried (``retries`` in profiles/slurm);
    a retry with the same request would be killed again.
    """
    return (
        lambda wildcards, attempt: (base(wildcards) if callable(base) else base)
        * attempt
    )


def eval_mem_mb(wildcards):
    """float32 reference model + bundle: 4 bytes per parameter twice, plus 2 GB of headroom."""
    spec = MODELS[wildcards.model]
    if "generate" in spec or "train" in spec:  # a few million parameters
        return 3000
    # 3.6 B parameters × ~10 bytes (fp32 reference, activations, bundle)
    return 2000 + 10 * 3600


def quality_reports(wildcards):
    """Every row of a model's report: its bundles, the gguf peers, and llama.cpp itself if configured.

    Why llama.cpp is opt-in (``llama_cpp_types``, and only where llama-cpp-python is installed): that
    optional extra compiles llama.cpp for 10-40 min, so CI and the default configs leave it out.
    """
    m = wildcards.model
    return (
        [f"reports/{m}/{q}/quality.json" for q in config["quantizations"]]
        + [f"reports/{m}/gguf-{g}/quality.json" for g in GGUF_PEER_TYPES]
        + [f"reports/{m}/llama.cpp-{t}/quality.json" for t in LLAMA_CPP_ROWS]
    )
