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
