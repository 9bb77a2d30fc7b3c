# App configs and the final bundle directory with its MANIFEST.


rule app_config:
    input:
        code=code("package"),
        index="build/{model}/{quant}/params/tensor-cache.json",
        chat_config="build/{model}/{quant}/mlc-chat-config.json",
    output:
        seed="build/{model}/{quant}/app-config.json",
        mlc="build/{model}/{quant}/mlc-app-config.json",
    log:
        "logs/{model}/{quant}/app_config.log",
    conda:
        "../envs/tvm.yaml"
    resources:
        mem_mb=per_attempt(500),
        runtime=per_attempt(5),
    params:
        model_id=lambda w: layout.bundle_id(w.model, w.quant),
        model_lib=lambda w: layout.system_lib_prefix(w.model, w.quant),
        url=lambda w: (
            f"--model-url {shlex.quote(model_spec(w)['model_url'])}"
            if model_spec(w).get("model_url")
            else ""
        ),
        params_dir=lambda w: layout.params_dir(w.model, w.quant),
    shell:
        "python scripts/package.py app-config --model-id {params.model_id} --model-lib {params.model_lib}"
        " {params.url} --params {params.params_dir} --chat-config {input.chat_config}"
        " --seed-out {output.seed} --mlc-out {output.mlc} > {log} 2>&1"


rule package:
    input:
        code=code("package"),
        index="build/{model}/{quant}/params/tensor-cache.json",
        shards=shard_files,
        chat_config="build/{model}/{quant}/mlc-chat-config.json",
        tokenizer="build/{model}/tokenizer/tokenizer.json",
        libs=bundle_libs,
        seed="build/{model}/{quant}/app-config.json",
        mlc="build/{model}/{quant}/mlc-app-config.json",
        snapshot="resources/models/{model}/snapshot.json",
    output:
        bundle=directory("dist/{model}-{quant}"),
    log:
        "logs/{model}/{quant}/package.log",
    conda:
        "../envs/tvm.yaml"
    resources:
        mem_mb=per_attempt(1000),
        runtime=per_attempt(30),
    params:
        model_id=lambda w: layout.bundle_id(w.model, w.quant),
        params_dir=lambda w: layout.params_dir(w.model, w.quant),
        tokenizer_dir=lambda w: layout.tokenizer_dir(w.model),
        libs=lambda w, input: " ".join(f"--lib {p}" for p in input.libs),
        targets=" ".join(f"--target {t}" for t in TARGETS_BUILT),
    shell:
        "python scripts/package.py bundle --model-id {params.model_id} --params {params.params_dir}"
        " --chat-config {input.chat_config} --tokenizer {params.tokenizer_dir} {params.libs}"
        " --app-config {input.seed} --mlc-app-config {input.mlc} --snapshot {input.snapshot}"
        " --model {wildcards.model} {params.targets} -o {output.bundle} > {log} 2>&1"


rule unknown_bundle:
    input:
        reject_bundle,
    output:
        directory("dist/{bundle}"),
    log:
        "logs/unknown_bundle/{bundle}.log",
    wildcard_constraints:
        bundle=not_a_bundle(),
    conda:
        "../envs/tvm.yaml"
    shell:
        "false"
