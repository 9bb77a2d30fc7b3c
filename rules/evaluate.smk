# Quality and speed reports: every bundle and the gguf peers against the float32 reference, and
# llama.cpp's own inference of its GGUFs where the config asks for it (llama_cpp_types; optional).


rule evaluate:
    input:
        code=code("evaluate"),
        snapshot="resources/models/{model}/snapshot.json",
        index="build/{model}/{quant}/params/tensor-cache.json",
        chat_config="build/{model}/{quant}/mlc-chat-config.json",
        tokenizer="build/{model}/tokenizer/tokenizer.json",
        lib="build/{model}/{quant}/lib/{model}-{quant}-llvm.so",
        text=eval_text_input,
    output:
        quality="reports/{model}/{quant}/quality.json",
    log:
        "logs/{model}/{quant}/evaluate.log",
    benchmark:
        "benchmarks/{model}/{quant}/evaluate.tsv"
    conda:
        "../envs/report.yaml"
    threads: 2
    resources:
        mem_mb=per_attempt(eval_mem_mb),
        runtime=per_attempt(120),
    params:
        model_dir=lambda w: layout.snapshot_dir(w.model),
        params_dir=lambda w: layout.params_dir(w.model, w.quant),
        source=eval_source_args,
    shell:
        "python scripts/evaluate.py {params.model_dir} --tokenizer {input.tokenizer}"
        " --params {params.params_dir} --lib {input.lib}"
        " --chat-config {input.chat_config} {params.source} -o {output.quality} > {log} 2>&1"


rule evaluate_gguf:
    input:
        code=code("evaluate"),
        snapshot="resources/models/{model}/snapshot.json",
        tokenizer="build/{model}/tokenizer/tokenizer.json",
        text=eval_text_input,
    output:
        quality="reports/{model}/gguf-{gtype}/quality.json",
    log:
        "logs/{model}/gguf-{gtype}/evaluate.log",
    benchmark:
        "benchmarks/{model}/gguf-{gtype}/evaluate.tsv"
    conda:
        "../envs/report.yaml"
    threads: 2
    resources:
        mem_mb=per_attempt(eval_mem_mb),
        runtime=per_attempt(120),
    params:
        model_dir=lambda w: layout.snapshot_dir(w.model),
        source=eval_source_args,
        window=config["max_seq_len"],
        template_json=template_json,
    shell:
        "python scripts/evaluate.py {params.model_dir} --tokenizer {input.tokenizer}"
        " --gguf-type {wildcards.gtype} --conv-template-json {params.template_json:q}"
        " --window {params.window} {params.source} -o {output.quality} > {log} 2>&1"


rule evaluate_llama_cpp:
    input:
        code=code("evaluate"),
        snapshot="resources/models/{model}/snapshot.json",
        tokenizer="build/{model}/tokenizer/tokenizer.json",
        text=eval_text_input,
    output:
        quality="reports/{model}/llama.cpp-{ltype}/quality.json",
    log:
        "logs/{model}/llama.cpp-{ltype}/evaluate.log",
    benchmark:
        "benchmarks/{model}/llama.cpp-{ltype}/evaluate.tsv"
    conda:
        "../envs/report.yaml"
    threads: 2
    resources:
        mem_mb=per_attempt(eval_mem_mb),
        runtime=per_attempt(120),
    params:
        model_dir=lambda w: layout.snapshot_dir(w.model),
        source=eval_source_args,
        window=config["max_seq_len"],
        template_json=template_json,
    shell:
        "python scripts/evaluate.py {params.model_dir} --tokenizer {input.tokenizer}"
        " --llama-cpp-type {wildcards.ltype} --conv-template-json {params.template_json:q}"
        " --window {params.window} {params.source} -o {output.quality} > {log} 2>&1"


rule unigram_baseline:
    input:
        code=code("evaluate"),
        tokenizer="build/{model}/tokenizer/tokenizer.json",
        train=lambda w: training_text(w.model),
        text=eval_text_input,
    output:
        baseline="reports/{model}/unigram.json",
    log:
        "logs/{model}/unigram_baseline.log",
    conda:
        "../envs/report.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(10),
    params:
        model_dir=lambda w: layout.snapshot_dir(w.model),
        source=eval_source_args,
        window=config["max_seq_len"],
    shell:
        "python scripts/evaluate.py {params.model_dir} --tokenizer {input.tokenizer}"
        " --unigram-train {input.train} --window {params.window} {params.source}"
        " -o {output.baseline} > {log} 2>&1"


rule summarize:
    input:
        unpack(summary_extras),
        reports=quality_reports,
        code=code("summarize"),
    output:
        csv=report(
            "reports/{model}/summary.csv",
            caption="../report/summary.rst",
            category="Quality",
        ),
        png=report(
            "reports/{model}/quality_vs_size.png",
            caption="../report/plot.rst",
            category="Quality",
        ),
        md=report(
            "reports/{model}/summary.md",
            caption="../report/verdicts.rst",
            category="Quality",
        ),
    log:
        "logs/{model}/summarize.log",
    conda:
        "../envs/report.yaml"
    resources:
        mem_mb=per_attempt(1000),
        runtime=per_attempt(5),
    params:
        extras=summary_extra_args,
    shell:
        "python scripts/summarize.py {input.reports} --csv {output.csv} --png {output.png}"
        " --markdown {output.md} {params.extras} --title {wildcards.model} > {log} 2>&1"


rule reports:
    input:
        expand("reports/{model}/summary.csv", model=config["build_models"]),
