"""neox-mlc-workflow: Hugging Face GPT-NeoX checkpoint -> MLC-LLM iOS bundle, with quality reports."""

from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


from neox_mlc.workflow_config import (
    report_failed_jobs,
    stop_on_bad_config,
    validate_config,
)

stop_on_bad_config(
    validate_config, config, Path(workflow.basedir) / "config" / "config.schema.yaml"
)


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/fetch.smk"
include: "rules/corpus.smk"
include: "rules/tokenizer.smk"
include: "rules/convert.smk"
include: "rules/config.smk"
include: "rules/compile.smk"
include: "rules/package.smk"
include: "rules/evaluate.smk"


onerror:
    report_failed_jobs(log)


localrules:
    all,
    reports,


rule all:
    default_target: True
    input:
        all_targets,
