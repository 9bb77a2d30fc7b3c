# The model library per target, compiled from the chat config with TVM Relax.


rule compile:
    input:
        code=code("compile"),
        chat_config="build/{model}/{quant}/mlc-chat-config.json",
    output:
        lib="build/{model}/{quant}/lib/{model}-{quant}-{target}.{ext}",
    log:
        "logs/{model}/{quant}/compile_{target}.{ext}.log",
    benchmark:
        "benchmarks/{model}/{quant}/compile_{target}.{ext}.tsv"
    conda:
        "../envs/tvm.yaml"
    threads: 2
    resources:
        mem_mb=per_attempt(8000),
        runtime=per_attempt(60),
        gpu=lambda w: 1 if w.target == "cuda" else 0,
    params:
        prefix=lambda w: layout.system_lib_prefix(w.model, w.quant),
        backend=BACKEND,
        # only the host library depends on it: changing it reruns the llvm builds alone
        host_cpu=lambda w: HOST_CPU if w.target in ("llvm", "cpu") else "auto",
    shell:
        "python scripts/compile.py {input.chat_config} --device {wildcards.target}"
        " --system-lib-prefix {params.prefix} --backend {params.backend} --host-cpu {params.host_cpu}"
        " -o {output.lib} > {log} 2>&1"
