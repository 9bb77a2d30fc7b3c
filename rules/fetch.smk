# The model checkpoint: generated offline (tiny default), taken from a local path, or downloaded.


rule generate_tiny_model:
    input:
        code=code("make_tiny_model"),
        corpus="data/corpus_ja.txt",
    output:
        config="resources/generated/{model}/config.json",
        weights="resources/generated/{model}/model.safetensors",
        tokenizer="resources/generated/{model}/tokenizer.json",
    log:
        "logs/{model}/generate_tiny_model.log",
    benchmark:
        "benchmarks/{model}/generate_tiny_model.tsv"
    wildcard_constraints:
        model=_alternation(GENERATED_MODELS) if GENERATED_MODELS else "(?!x)x",
    conda:
        "../envs/hf.yaml"
    threads: 2
    resources:
        mem_mb=per_attempt(3000),
        runtime=per_attempt(20),
    params:
        args=generate_args,
        out=lambda w: layout.generated_dir(w.model),
    shell:
        "python scripts/make_tiny_model.py -o {params.out} --corpus {input.corpus} {params.args}"
        " --threads {threads} > {log} 2>&1"


checkpoint model_config:
    input:
        fetch_inputs,
        code=code("fetch_model"),
    output:
        config="resources/configs/{model}/config.json",
    log:
        "logs/{model}/model_config.log",
    conda:
        "../envs/hf.yaml"
    resources:
        mem_mb=per_attempt(1000),
        runtime=per_attempt(10),
    params:
        source=fetch_source_args,
    shell:
        "python scripts/fetch_model.py {params.source} --config-only -o {output.config} > {log} 2>&1"


rule fetch_model:
    input:
        fetch_inputs,
        code=code("fetch_model"),
        # config.json alone first: a max_seq_len the model cannot hold stops here, before the download
        model_config=checked_model_config,
    output:
        config="resources/models/{model}/config.json",
        snapshot="resources/models/{model}/snapshot.json",
    log:
        "logs/{model}/fetch_model.log",
    benchmark:
        "benchmarks/{model}/fetch_model.tsv"
    conda:
        "../envs/hf.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(120),
    params:
        source=fetch_source_args,
        out=lambda w: layout.snapshot_dir(w.model),
    shell:
        "python scripts/fetch_model.py {params.source} -o {params.out} > {log} 2>&1"
