"""What a host library's entry functions call: the kernel names, read from the module export_module builds."""

from pathlib import Path


def called_kernels(chat_config: Path, function: str, host_cpu: str | None) -> list[str]:
    """Names of the kernels ``function`` ("prefill" or "decode") calls, in call order, for an ``llvm``
    build of ``chat_config`` for ``host_cpu`` (None: this machine's default)."""
    from tvm import relax

    from neox_mlc.compile import export_module

    names: list[str] = []
    relax.analysis.post_order_visit(
        export_module(chat_config, "llvm", host_cpu=host_cpu)[0][function],
        lambda e: names.append(e.args[0].name_hint) if isinstance(e, relax.Call) and e.args and hasattr(e.args[0], "name_hint") else None,
    )
    return names


def workspace_allocs_in_tasks(executable) -> dict[str, int]:
    """For each parallel task body (``__tvm_parallel_lambda*`` in the LLVM IR) of a ``tvm.compile``d
    kernel, how many TVMBackendAllocWorkspace calls it makes: each runs once per task, so a decode
    kernel's task should make none (its scratch on the stack, cpu_gemv.SCRATCH)."""
    import re

    counts: dict[str, int] = {}
    current = None
    for line in executable.mod.inspect_source("ll").splitlines():
        define = re.match(r"define [^@]*@([\w.$]+)\(", line)
        if define:
            current = define.group(1) if define.group(1).startswith("__tvm_parallel_lambda") else None
            if current:
                counts[current] = 0
        elif current and "__TVMBackendAllocWorkspace" in line:
            counts[current] += 1
    return counts
