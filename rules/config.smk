# mlc-chat-config.json: context window = max_seq_len, conversation template from config.yaml.


rule gen_config:
    input:
        code=code("gen_config"),
        config="resources/models/{model}/config.json",
        tokenizer="build/{model}/tokenizer/tokenizer.json",
    output:
        chat_config="build/{model}/{quant}/mlc-chat-config.json",
    log:
        "logs/{model}/{quant}/gen_config.log",
    conda:
        "../envs/tvm.yaml"
    resources:
        mem_mb=per_attempt(1000),
        runtime=per_attempt(5),
    params:
        model_dir=lambda w: layout.snapshot_dir(w.model),
        tokenizer_dir=lambda w: layout.tokenizer_dir(w.model),
        out=lambda w: layout.quant_dir(w.model, w.quant),
        max_seq_len=config["max_seq_len"],
        template=lambda w: model_spec(w)["conv_template"],
        template_json=template_json,
    shell:
        "python scripts/gen_config.py {params.model_dir} --quantization {wildcards.quant}"
        " --conv-template {params.template} --conv-template-json {params.template_json:q}"
        " --context-window-size {params.max_seq_len} --tokenizer-dir {params.tokenizer_dir}"
        " --skip-tokenizer-copy -o {params.out} > {log} 2>&1"
