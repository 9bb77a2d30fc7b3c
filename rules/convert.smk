# Weight conversion to MLC's tensor cache: plan (checkpoint) -> one job per shard -> index.


checkpoint weight_plan:
    input:
        code=code("convert_weight"),
        snapshot="resources/models/{model}/snapshot.json",
    output:
        plan="build/{model}/{quant}/weight-plan.json",
    log:
        "logs/{model}/{quant}/weight_plan.log",
    conda:
        "../envs/tvm.yaml"
    resources:
        mem_mb=per_attempt(1000),
        runtime=per_attempt(10),
    params:
        model_dir=lambda w: layout.snapshot_dir(w.model),
        params_dir=lambda w: layout.params_dir(w.model, w.quant),
        backend=BACKEND,
    shell:
        "python scripts/convert_weight.py {params.model_dir} --quantization {wildcards.quant}"
        " --backend {params.backend} -o {params.params_dir} --plan-only {output.plan} > {log} 2>&1"


rule convert_shard:
    input:
        code=code("convert_weight"),
        plan="build/{model}/{quant}/weight-plan.json",
        # the weights themselves: the plan only lists shapes, so it is unchanged when values change
        snapshot="resources/models/{model}/snapshot.json",
    output:
        shard="build/{model}/{quant}/params/params_shard_{shard}.bin",
    log:
        "logs/{model}/{quant}/convert_shard_{shard}.log",
    benchmark:
        "benchmarks/{model}/{quant}/convert_shard_{shard}.tsv"
    conda:
        "../envs/tvm.yaml"
    threads: 2
    resources:
        mem_mb=per_attempt(3000),
        runtime=per_attempt(30),
    params:
        model_dir=lambda w: layout.snapshot_dir(w.model),
        out=lambda w: layout.params_dir(w.model, w.quant),
    shell:
        "python scripts/convert_weight.py {params.model_dir} --quantization {wildcards.quant}"
        " --plan {input.plan} --shard {wildcards.shard} --threads {threads} -o {params.out} > {log} 2>&1"


rule weights_index:
    input:
        code=code("convert_weight"),
        plan="build/{model}/{quant}/weight-plan.json",
        shards=shard_files,
    output:
        index="build/{model}/{quant}/params/tensor-cache.json",
        index_b16="build/{model}/{quant}/params/tensor-cache-b16.json",
    log:
        "logs/{model}/{quant}/weights_index.log",
    conda:
        "../envs/tvm.yaml"
    resources:
        mem_mb=per_attempt(1000),
        runtime=per_attempt(15),
    params:
        model_dir=lambda w: layout.snapshot_dir(w.model),
        out=lambda w: layout.params_dir(w.model, w.quant),
    shell:
        "python scripts/convert_weight.py {params.model_dir} --quantization {wildcards.quant}"
        " --plan {input.plan} --index -o {params.out} > {log} 2>&1"
