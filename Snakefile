"""neox-mlc-workflow: Hugging Face GPT-NeoX checkpoint -> MLC-LLM iOS bundle, with quality reports."""

import os
import sys

from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, workflow.basedir)


configfile: "config.yaml"


validate(config, "config/config.schema.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/fetch.smk"
include: "rules/tokenizer.smk"
include: "rules/convert.smk"
include: "rules/config.smk"
include: "rules/compile.smk"
include: "rules/package.smk"
include: "rules/evaluate.smk"


rule all:
    default_target: True
    input:
        all_targets,
