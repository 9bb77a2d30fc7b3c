"""CUDA kernels as machine code inside the model library: nvcc at build time, and reading them back.

Why: the PyPI apache-tvm 0.26 compiler is built without CUDA, so ``target.build.cuda`` only wraps
the generated CUDA *source* (module format ``cuda``), and the runtime compiles it when the library
is loaded, through a Python ``tvm_callback_cuda_compile`` (NVRTC or nvcc) that takes the arch from
``Target.current()`` — unset at load time — or from the GPU. A deployed, runtime-only TVM has no
compiler at all. So here every kernel is compiled to a fatbin with nvcc for an explicit arch list
while the library is exported, and the fatbin replaces the source in the serialized module
(format ``fatbin``; TVM's CUDA loader hands any non-``cuda`` format to ``cuModuleLoadData``).

The serialized forms read and written here are TVM's own: the library blob
``<nbytes u64> <import tree: indptr vec<u64>, children vec<u64>> (<kind str> [<payload bytes>])*``
(tvm-ffi ``library_module.cc``), where a ``cuda`` payload is ``<fmt str> <fmap> <code bytes>``
(``CUDAModuleNode::SaveToBytes``); strings and byte runs are ``<len u64> <bytes>``, little-endian.
"""

from __future__ import annotations

import re
import shutil
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from neox_mlc.common import WorkflowError

DEFAULT_ARCHS = ("sm_90",)  # the H200/H100 this project's GPU checks run on
ARCH_RE = re.compile(r"^sm_(\d{2,3})a?$")
BLOB_SYMBOL = "__tvm_ffi__library_bin"
FATBIN_MAGIC = 0xBA55ED50
FATBIN_ELF, FATBIN_PTX = 2, 1


def parse_archs(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"sm_90,sm_80"`` (or a sequence) -> ``("sm_80", "sm_90")``, lowest first; default ``sm_90``."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec or DEFAULT_ARCHS) if s.strip()]
    bad = [s for s in items if not ARCH_RE.match(s)]
    if bad or not items:
        raise WorkflowError(f"CUDA arch {bad[0] if bad else spec!r} is not valid; allowed: sm_NN or sm_NNa names, comma-separated (e.g. sm_90,sm_80)")
    return tuple(sorted(set(items), key=lambda s: (int(ARCH_RE.match(s).group(1)), s)))


def require_nvcc() -> str:
    """nvcc's path, or a one-line error before any compile work starts."""
    path = shutil.which("nvcc")
    if path is None:
        raise WorkflowError("device cuda needs the CUDA toolkit's nvcc on PATH to build kernels (none found); no GPU is needed")
    return path


def compile_fatbin(source: str, archs: Sequence[str], target: Any) -> bytes:
    """nvcc the generated CUDA source to one fatbin holding SASS for every arch (no PTX, so nothing JITs).

    TVM's own nvcc wrapper is used for its flags (half/bfloat16 operators, fast math); it reads the
    compute version from ``Target.current()``, hence the target scope.
    """
    from tvm.support import nvcc

    gencode: list[str] = []
    for arch in archs:
        num = arch[3:]
        gencode += ["-gencode", f"arch=compute_{num},code={arch}"]
    with target:
        return bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=gencode, compiler="nvcc"))


class _Reader:
    """Little-endian cursor over TVM's serialized bytes."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def blob(self) -> bytes:
        n = self.u64()
        out = self.data[self.pos : self.pos + n]
        if len(out) != n:
            raise ValueError("truncated TVM library blob")
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        self.pos += n

    def u64_vector(self) -> list[int]:
        n = self.u64()
        return [self.u64() for _ in range(n)]


def _str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def split_library_blob(blob: bytes) -> tuple[bytes, list[tuple[str, bytes | None]]]:
    """``(import tree bytes, [(kind, payload or None for the host library)])`` of a library blob."""
    r = _Reader(blob)
    nbytes = r.u64()
    if nbytes + 8 != len(blob):
        raise ValueError(f"library blob says {nbytes} bytes, holds {len(blob) - 8}")
    indptr = r.u64_vector()
    r.u64_vector()
    tree = blob[8 : r.pos]
    modules: list[tuple[str, bytes | None]] = []
    for _ in range(len(indptr) - 1):
        kind = r.blob().decode()
        modules.append((kind, None if kind == "_lib" else r.blob()))
    return tree, modules


def join_library_blob(tree: bytes, modules: Iterable[tuple[str, bytes | None]]) -> bytes:
    body = tree + b"".join(_str(k.encode()) + (b"" if p is None else _str(p)) for k, p in modules)
    return struct.pack("<Q", len(body)) + body


def split_cuda_payload(payload: bytes) -> tuple[str, bytes, bytes, list[str]]:
    """``(fmt, fmap bytes, code, kernel names)`` of a serialized CUDA module.

    The fmap is ``<count u64>`` then per kernel ``<key str> <name str> <arg types: vec<4-byte
    DLDataType>> <launch tags: vec<str>> <arg extra tags: vec<int32>>``.
    """
    r = _Reader(payload)
    fmt = r.blob().decode()
    start = r.pos
    names = []
    for _ in range(r.u64()):
        names.append(r.blob().decode())
        r.blob()
        r.skip(4 * r.u64())  # arg types
        for _ in range(r.u64()):
            r.blob()
        r.skip(4 * r.u64())  # arg extra tags
    fmap_end = r.pos
    code = r.blob()
    if r.pos != len(payload):
        raise ValueError(f"cuda module payload has {len(payload) - r.pos} unread bytes")
    return fmt, payload[start:fmap_end], code, names


def fatbin_payload(payload: bytes, fatbin: bytes) -> bytes:
    """The same CUDA module (same kernel table) carrying ``fatbin`` instead of source."""
    _, fmap, _, _ = split_cuda_payload(payload)
    return _str(b"fatbin") + fmap + _str(fatbin)


def compile_library_blob(blob: bytes, compile_source: Callable[[str], bytes]) -> bytes:
    """Replace every CUDA-source module of a library blob by its compiled fatbin."""
    tree, modules = split_library_blob(blob)
    out: list[tuple[str, bytes | None]] = []
    for kind, payload in modules:
        if kind == "cuda" and payload is not None:
            fmt, _, code, _ = split_cuda_payload(payload)
            if fmt == "cuda":
                payload = fatbin_payload(payload, compile_source(code.decode()))
        out.append((kind, payload))
    return join_library_blob(tree, out)


def fatbin_pack_imports(archs: Sequence[str], target: Any) -> Callable[[Any, bool, str, str], str]:
    """An ``export_library(fpack_imports=...)`` that packs the imports with CUDA compiled to a fatbin.

    It serializes the imports exactly as TVM does, swaps the CUDA source for the fatbin, and
    emits the blob as an assembler file the linker takes like TVM's own packed-imports object.
    """

    def pack(module: Any, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        import tvm

        blob = tvm.get_global_func("runtime.ModulePackImportsToTensor")(module).numpy().tobytes()
        blob = compile_library_blob(blob, lambda src: compile_fatbin(src, archs, target))
        work = Path(workspace_dir)
        (work / "imports.bin").write_bytes(blob)
        symbol = symbol_prefix + tvm.get_global_func("runtime.ModuleImportsBlobName")()
        asm = work / f"{symbol_prefix}devc.S"
        asm.write_text(
            f'\t.section .rodata\n\t.globl {symbol}\n\t.type {symbol}, @object\n{symbol}:\n'
            f'\t.incbin "{work / "imports.bin"}"\n\t.size {symbol}, {len(blob)}\n'
            '\t.section .note.GNU-stack,"",@progbits\n'
        )
        return str(asm)

    return pack


def read_library_blob(lib: str | Path) -> bytes:
    """The packed-imports blob of an exported shared library, read from the loaded image.

    TVM's runtime must be loaded first (``import tvm``): the library's undefined symbols live there.
    """
    import ctypes

    import tvm  # noqa: F401  (provides the symbols the library links against)

    handle = ctypes.CDLL(str(Path(lib).resolve()), mode=ctypes.RTLD_LOCAL)
    addr = ctypes.addressof(ctypes.c_ubyte.in_dll(handle, BLOB_SYMBOL))
    (nbytes,) = struct.unpack("<Q", ctypes.string_at(addr, 8))
    return ctypes.string_at(addr, nbytes + 8)


def fatbin_entries(fatbin: bytes) -> list[str]:
    """What a fatbin holds, one name per entry: ``sm_90`` for machine code, ``compute_90`` for PTX."""
    magic, _, header, size = struct.unpack_from("<IHHQ", fatbin, 0)
    if magic != FATBIN_MAGIC:
        raise ValueError("not a CUDA fatbin")
    names, pos = [], header
    while pos < header + size:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", fatbin, pos)
        (arch,) = struct.unpack_from("<I", fatbin, pos + 28)
        names.append(f"{'sm' if kind == FATBIN_ELF else 'compute'}_{arch}")
        pos += entry_header + payload
    return names


def cuda_kernels_of(lib: str | Path) -> dict[str, Any]:
    """How an exported CUDA library carries its kernels: format, arch entries, kernel count, size."""
    _, modules = split_library_blob(read_library_blob(lib))
    found = []
    for kind, payload in modules:
        if kind != "cuda" or payload is None:
            continue
        fmt, _, code, names = split_cuda_payload(payload)
        found.append({"format": fmt, "entries": fatbin_entries(code) if fmt == "fatbin" else [], "bytes": len(code), "kernels": len(names)})
    if not found:
        raise WorkflowError(f"{lib} holds no CUDA module")
    return found[0] if len(found) == 1 else {"modules": found}
