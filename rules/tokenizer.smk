# The fast tokenizer (tokenizer.json) the MLC runtime reads.


rule tokenizer:
    input:
        code=code("make_tokenizer"),
        snapshot="resources/models/{model}/snapshot.json",
        # every line must tokenize as sentencepiece does (SentencePiece-only checkpoints)
        check=["data/corpus_ja.txt", "data/eval_ja.txt"],
    output:
        tokenizer="build/{model}/tokenizer/tokenizer.json",
    log:
        "logs/{model}/tokenizer.log",
    conda:
        "../envs/hf.yaml"
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(15),
    params:
        model_dir=lambda w: layout.snapshot_dir(w.model),
        out=lambda w: layout.tokenizer_dir(w.model),
    shell:
        "python scripts/make_tokenizer.py {params.model_dir} -o {params.out}"
        " --check-text {input.check} > {log} 2>&1"
