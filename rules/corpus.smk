# The evaluation model (config/manpages.yaml): a packaged Japanese corpus, fetched, made plain text
# and split; a SentencePiece tokenizer and a small GPT-NeoX trained on its training split.


rule fetch_corpus:
    input:
        code=code("corpus"),
    output:
        deb="resources/corpus/{corpus}.deb",
    log:
        "logs/corpus/{corpus}/fetch.log",
    conda:
        "../envs/hf.yaml"
    resources:
        mem_mb=per_attempt(500),
        runtime=per_attempt(10),
    params:
        package=lambda w: CORPORA[w.corpus]["debian_package"],
        version=lambda w: CORPORA[w.corpus]["version"],
        sha256=lambda w: CORPORA[w.corpus]["sha256"],
    shell:
        "python scripts/corpus.py fetch --package {params.package} --version {params.version:q}"
        " --sha256 {params.sha256} -o {output.deb} > {log} 2>&1"


rule prepare_corpus:
    input:
        code=code("corpus"),
        deb="resources/corpus/{corpus}.deb",
    output:
        train="resources/corpus/{corpus}/train.txt",
        heldout="resources/corpus/{corpus}/heldout.txt",
        info="resources/corpus/{corpus}/corpus.json",
    log:
        "logs/corpus/{corpus}/prepare.log",
    conda:
        "../envs/hf.yaml"
    resources:
        mem_mb=per_attempt(1500),
        runtime=per_attempt(10),
    params:
        package=lambda w: CORPORA[w.corpus]["debian_package"],
        heldout_pct=lambda w: CORPORA[w.corpus].get("heldout_pct", 5),
        out=lambda w: f"resources/corpus/{w.corpus}",
    shell:
        "python scripts/corpus.py prepare {input.deb} --package {params.package}"
        " --heldout-pct {params.heldout_pct} -o {params.out} > {log} 2>&1"


rule train_model:
    input:
        code=code("train_neox"),
        train=lambda w: corpus_file(w.model, "train"),
    output:
        config="resources/generated/{model}/config.json",
        weights="resources/generated/{model}/model.safetensors",
        spiece="resources/generated/{model}/spiece.model",
        record="resources/generated/{model}/training.json",
    log:
        "logs/{model}/train_model.log",
    benchmark:
        "benchmarks/{model}/train_model.tsv"
    wildcard_constraints:
        model=_alternation(TRAINED_MODELS) if TRAINED_MODELS else "(?!x)x",
    conda:
        "../envs/hf.yaml"
    threads: lambda w: MODELS[w.model]["train"].get("threads", 2)
    resources:
        mem_mb=per_attempt(3000),
        runtime=per_attempt(60),
    params:
        args=train_args,
        out=lambda w: layout.generated_dir(w.model),
    shell:
        "python scripts/train_neox.py {input.train} -o {params.out} {params.args} > {log} 2>&1"
