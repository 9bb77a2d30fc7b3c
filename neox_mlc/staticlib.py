"""Mach-O objects and Darwin static archives: the symbols an iOS model library defines and needs.

Why in Python: the app links ``libmodel_iphone.a`` (MLC's ``mlc_llm package`` makes it with
``tvm.support.cc.create_staticlib``, i.e. ``ar -crs``, and validates it with ``nm -gU``), but on Linux
GNU ``ar``/``nm`` cannot read arm64 Mach-O, so the archive gets no table of contents and the
validation finds no libraries (mlc-llm issue #3251: "current available model_libs in
dist/lib/libmodel_iphone.a: []"). Reading the symbol table of a Mach-O object is a few structs, and
writing a BSD/Darwin archive with a ``__.SYMDEF`` table of contents is what ``llvm-ar --format=darwin``
and Apple's ``ranlib`` do; doing both here removes the dependency on a cross toolchain and keeps
the bytes deterministic (zero dates, uid/gid 0). The tests cross-check every result with Debian's
``llvm-nm`` / ``llvm-ar`` and ``file``.

Formats: ``<mach-o/loader.h>`` (``mach_header_64``, ``symtab_command``), ``<mach-o/nlist.h>``
(``nlist_64``: ``N_EXT``, ``N_TYPE``, ``N_UNDF``, ``N_WEAK_DEF``) and ``<ar.h>`` / ``<mach-o/ranlib.h>``
(``#1/<len>`` long names, ``struct ranlib {ran_strx, ran_off}``).
"""

from __future__ import annotations

import io
import struct
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from neox_mlc.common import WorkflowError

MH_MAGIC_64 = 0xFEEDFACF
CPU_TYPE_ARM64 = 0x0100000C
MH_OBJECT = 1
LC_SYMTAB = 0x2
N_STAB, N_TYPE, N_EXT, N_UNDF = 0xE0, 0x0E, 0x01, 0x0
N_WEAK_DEF = 0x0080
AR_MAGIC = b"!<arch>\n"
SYMDEF = "__.SYMDEF"
_NLIST64 = struct.Struct("<IBBHQ")


@dataclass(frozen=True)
class MachObject:
    """The external symbols of one relocatable arm64 Mach-O object (``nm -g`` view)."""

    name: str
    defined: frozenset[str]
    weak: frozenset[str]
    undefined: frozenset[str]

    @property
    def strong(self) -> frozenset[str]:
        """Defined and not weak: two of these with one name in one link is a duplicate-symbol error."""
        return self.defined - self.weak


def read_macho(data: bytes, name: str = "<object>") -> MachObject:
    """Parse a 64-bit arm64 Mach-O object's symbol table (``LC_SYMTAB``)."""
    if len(data) < 32:
        raise WorkflowError(f"{name}: {len(data)} bytes is too short for a Mach-O object")
    magic, cputype, _sub, filetype, ncmds, _sizeofcmds, _flags, _res = struct.unpack_from("<IiiIIIII", data, 0)
    if magic != MH_MAGIC_64:
        raise WorkflowError(f"{name}: not a 64-bit little-endian Mach-O object (magic {magic:#x}); allowed: {MH_MAGIC_64:#x}")
    if cputype != CPU_TYPE_ARM64 or filetype != MH_OBJECT:
        raise WorkflowError(f"{name}: Mach-O cputype {cputype:#x} filetype {filetype}; allowed: arm64 ({CPU_TYPE_ARM64:#x}) object (1)")
    defined, weak, undefined = set(), set(), set()
    off = 32
    for _ in range(ncmds):
        cmd, cmdsize = struct.unpack_from("<II", data, off)
        if cmd == LC_SYMTAB:
            symoff, nsyms, stroff, strsize = struct.unpack_from("<IIII", data, off + 8)
            strtab = data[stroff : stroff + strsize]
            for i in range(nsyms):
                strx, ntype, _sect, desc, value = _NLIST64.unpack_from(data, symoff + i * _NLIST64.size)
                if ntype & N_STAB or not ntype & N_EXT:
                    continue
                sym = strtab[strx : strtab.index(b"\0", strx)].decode("utf-8", "replace")
                if ntype & N_TYPE == N_UNDF and value == 0:
                    undefined.add(sym)
                else:
                    defined.add(sym)
                    if desc & N_WEAK_DEF:
                        weak.add(sym)
        if cmdsize < 8:
            raise WorkflowError(f"{name}: malformed load command of size {cmdsize}")
        off += cmdsize
    return MachObject(name, frozenset(defined), frozenset(weak), frozenset(undefined))


def tar_objects(path: Path) -> list[tuple[str, bytes]]:
    """The ``.o`` members of a TVM-exported library tar (``export_library`` for ``iphone``), in order."""
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        objs = [(Path(m.name).name, tar.extractfile(m).read()) for m in members if m.name.endswith(".o")]
    if not objs:
        raise WorkflowError(f"{path}: no .o objects inside; an iphone library tar holds arm64 Mach-O objects")
    return objs


def _pad8_name(name: bytes, header_at: int) -> bytes:
    """A ``#1/<len>`` name padded with NULs so the member's data starts 8-byte aligned (ld64 wants it)."""
    n = len(name) + 1
    while (header_at + 60 + n) % 8:
        n += 1
    return name.ljust(n, b"\0")


def _header(name_len: int, size: int, mode: str) -> bytes:
    head = f"#1/{name_len:<13}{0:<12}{0:<6}{0:<6}{mode:<8}{size:<10}`\n".encode()
    assert len(head) == 60
    return head


def write_archive(out: Path | io.BufferedIOBase, members: Iterable[tuple[str, bytes]]) -> list[MachObject]:
    """A Darwin ``ar`` archive of arm64 objects with a ``__.SYMDEF`` table of every defined external symbol.

    Member names must be unique (``ar x`` would overwrite otherwise). Returns the parsed objects.
    """
    members = list(members)
    names = [n for n, _ in members]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise WorkflowError(f"archive members must have unique names; repeated: {', '.join(dupes)}")
    objs = [read_macho(data, name) for name, data in members]
    # Lay out members first (offsets go into the table of contents), with the table's size known.
    strtab = bytearray()
    strx: list[tuple[int, int]] = []  # (string offset, member index)
    for i, obj in enumerate(objs):
        for sym in sorted(obj.defined):
            strx.append((len(strtab), i))
            strtab += sym.encode() + b"\0"
    while len(strtab) % 8:
        strtab += b"\0"
    symdef_name = _pad8_name(SYMDEF.encode(), len(AR_MAGIC))
    symdef_size = len(symdef_name) + 4 + 8 * len(strx) + 4 + len(strtab)
    offsets, pos = [], len(AR_MAGIC) + 60 + symdef_size
    bodies = []
    for name, data in members:
        enc = _pad8_name(name.encode(), pos)
        padded = data + b"\n" * (-len(data) % 8)
        offsets.append(pos)
        bodies.append(_header(len(enc), len(enc) + len(padded), "644") + enc + padded)
        pos += 60 + len(enc) + len(padded)
    if pos >= 1 << 32:
        raise WorkflowError(f"archive of {pos} bytes needs the 64-bit table of contents (__.SYMDEF_64); limit 4 GiB")
    ranlib = b"".join(struct.pack("<II", s, offsets[i]) for s, i in strx)
    symdef = symdef_name + struct.pack("<I", len(ranlib)) + ranlib + struct.pack("<I", len(strtab)) + bytes(strtab)
    blob = AR_MAGIC + _header(len(symdef_name), symdef_size, "0") + symdef + b"".join(bodies)
    if isinstance(out, Path):
        out.write_bytes(blob)
    else:
        out.write(blob)
    return objs


@dataclass
class Archive:
    """What a Darwin archive holds: members by name, and its table of contents (symbol -> member)."""

    members: dict[str, bytes] = field(default_factory=dict)
    toc: dict[str, list[str]] = field(default_factory=dict)

    def objects(self) -> list[MachObject]:
        return [read_macho(data, name) for name, data in self.members.items()]

    def global_symbols(self) -> set[str]:
        """Defined external symbols of every member: what ``nm -gU`` lists for the archive."""
        return set().union(*(o.defined for o in self.objects())) if self.members else set()


def read_archive(path: Path) -> Archive:
    """Parse a BSD/Darwin ``ar`` archive (``#1/`` long names, ``__.SYMDEF``/``__.SYMDEF SORTED`` table)."""
    data = path.read_bytes()
    if not data.startswith(AR_MAGIC):
        raise WorkflowError(f"{path}: not an ar archive (no '!<arch>' magic)")
    arc, pos, toc_raw, where = Archive(), len(AR_MAGIC), None, {}
    while pos + 60 <= len(data):
        head = data[pos : pos + 60]
        if head[58:60] != b"`\n":
            raise WorkflowError(f"{path}: bad member header at offset {pos}")
        raw_name, size = head[:16].decode().rstrip(), int(head[48:58].decode())
        body = data[pos + 60 : pos + 60 + size]
        if raw_name.startswith("#1/"):
            n = int(raw_name[3:])
            name, body = body[:n].rstrip(b"\0").decode(), body[n:]
        else:
            name = raw_name.rstrip("/")
        if name.startswith(SYMDEF):
            toc_raw = body
        else:
            where[pos] = name
            arc.members[name] = body
        pos += 60 + size + (size & 1)
    if toc_raw is not None:
        (nbytes,) = struct.unpack_from("<I", toc_raw, 0)
        (strsize,) = struct.unpack_from("<I", toc_raw, 4 + nbytes)
        strtab = toc_raw[8 + nbytes : 8 + nbytes + strsize]
        for k in range(nbytes // 8):
            s, off = struct.unpack_from("<II", toc_raw, 4 + 8 * k)
            sym = strtab[s : strtab.index(b"\0", s)].decode()
            arc.toc.setdefault(sym, []).append(where.get(off, f"<offset {off}>"))
    return arc
