# App configs, the bundle directory with its MANIFEST, and dist/app: every bundle in one iOS app
# laid out as `mlc_llm package` lays it out (lib/libmodel_iphone.a, bundle/).


rule app_config:
    input:
        code=code("package"),
        lib=lambda w: layout.library(w.model, w.quant, config["target"]),
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
        model_lib=lambda w: layout.model_lib(w.model, w.quant),
        url=app_model_url,
    shell:
        "python scripts/package.py app-config --model-id {params.model_id} --model-lib {params.model_lib}"
        " {params.url} --lib {input.lib} --chat-config {input.chat_config} --seed-out {output.seed} --mlc-out {output.mlc} > {log} 2>&1"


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


rule app:
    input:
        code=code("package"),
        bundles=app_bundles,
        package_config=config.get("package_config", []),
    output:
        app=directory(layout.app_dir()),
    log:
        "logs/app.log",
    conda:
        "../envs/tvm.yaml"
    resources:
        mem_mb=per_attempt(1000),
        runtime=per_attempt(30),
    params:
        bundles=lambda w, input: " ".join(f"--bundle {b}" for b in input.bundles),
        package_config=lambda w, input: (
            f"--package-config {input.package_config}" if input.package_config else ""
        ),
    shell:
        "python scripts/package.py app {params.bundles} {params.package_config} -o {output.app} > {log} 2>&1"
        " && (grep '^warning:' {log} >&2 || true)"


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
