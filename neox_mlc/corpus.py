"""A packaged Japanese corpus for the evaluation model: Debian's ``manpages-ja``, fetched and made plain text.

Why: a quality report needs a model that generalises, and that needs a few MB of real Japanese text
the workflow can fetch offline-reproducibly. Debian ships ~4 MB (compressed) of Japanese man pages
(JM Project translations, each under its original page's DFSG-free licence; see the package's
``copyright``). ``apt-get download`` fetches the pinned version; its sha256 is checked before use.
The roff sources become running text, one man page per line with ``<NL>`` between paragraphs
(the LINE template's newline token), and whole pages go to a held-out split chosen by a hash of
their path, so the evaluation text never enters tokenizer or model training.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import lzma
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neox_mlc.common import WorkflowError, atomic_path, sha256_file, write_json

PARAGRAPH_SEP = "<NL>"
MAN_ROOT = "./usr/share/man/ja/"
COPYRIGHT = "./usr/share/doc/{package}/copyright"


# macros whose arguments are not running text (layout, definitions, registers)
_SKIP = {
    "TH", "PD", "in", "ti", "ft", "ad", "na", "ne", "hy", "nh", "ll", "so", "ds", "nr", "if", "ie", "el", "de", "am",
    "ig", "tr", "cs", "ss", "ps", "vs", "ls", "ta", "mk", "rt", "ev", "lf", "pc", "rm", "rn", "ch", "wh", "em", "it",
    "Dd", "Dt", "Os", "Bl", "El", "Bd", "Ed", "Bf", "Ef", "Bk", "Ek", "TS", "TE", "EX", "EE", "nf", "fi", "UC", "DT",
    "IX", "hw", "cc", "c2", "ec", "eo", "fc", "lc", "mc", "nm", "nn", "po", "sy", "pl", "bp", "fl", "tm", "ab", "fam",
    "pso", "mso", "ns", "rs", "Ns", "Ux", "At", "Bx", "Fx", "Nx", "Ox", "Bsx", "Db", "Sm", "AT", "UE", "ME", "MT", "UR",
    "YS", "SY", "OP", "TQ", "cu", "ul", "ce", "rj", "sp", "br", "PP", "LP", "P", "Pp", "Lp", "RS", "RE", "HP", "IP",
    "TP", "SH", "SS", "Sh", "Ss", "It",
}
# macros that end a paragraph (the text so far becomes one line)
_BREAK = {"PP", "LP", "P", "Pp", "Lp", "sp", "br", "SH", "SS", "Sh", "Ss", "TP", "IP", "HP", "It", "RS", "RE", "nf", "fi",
          "TS", "TE", "EX", "EE", "Bl", "El", "Bd", "Ed", "TQ", "SY", "YS", "bp", "ce"}
# macros whose arguments are printed (headings, items, font changes)
_HEADINGS = {"SH", "SS", "Sh", "Ss"}
_ESCAPES = {
    "-": "-", "e": "\\", "&": "", "|": "", "^": "", "0": " ", " ": " ", "~": " ", "%": "", ":": "", "/": "", ",": "",
    "c": "", "'": "'", "`": "`", "\\": "\\", ".": ".", "t": " ", "{": "", "}": "", "!": "", "p": "", "n": "",
}
_NAMED = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’",
    "bu": "•", "co": "©", "rg": "®", "tm": "™", "de": "°", "+-": "±", "mu": "×", "di": "÷", "<=": "≤", ">=": "≥",
    "!=": "≠", "->": "→", "<-": "←", "ga": "`", "ti": "~", "ha": "^", "rs": "\\", "ba": "|", "bv": "|", "sl": "/",
    "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "sc": "§", "ps": "¶", "ua": "↑", "da": "↓", "dg": "†", "lh": "☜",
    "rh": "☞", "br": "|", "ul": "_", "ru": "_", "pl": "+", "eq": "=", "sq": "□", "ci": "○", "OK": "✓", "Tm": "™",
}
_STRINGS = {"lq": "“", "rq": "”", "R": "®", "Tm": "™", "S": "", "(lq": "“", "(rq": "”", "(Tm": "™"}

_ESC_RE = re.compile(
    r"\\(?:"
    r"f(?:\[[^\]]*\]|\(..|.)"  # font
    r"|s[+-]?(?:\[[^\]]*\]|\(..|\d\d?|'[^']*')"  # size
    r"|\*(?:\[[^\]]*\]|\(..|.)"  # string
    r"|\((..)"  # named char
    r"|\[([^\]]*)\]"  # named char, long
    r"|[hvwlLoxXkbDNZYVRMmgAHSuBzn]'[^']*'"  # escapes with quoted arguments (dropped)
    r"|[kgnmMVY](?:\[[^\]]*\]|\(..|.)"
    r"|\"[^\n]*"  # comment
    r"|(.)"
    r")"
)


def _escape(m: re.Match) -> str:
    whole = m.group(0)
    if m.group(1) is not None:
        return _NAMED.get(m.group(1), "")
    if m.group(2) is not None:
        name = m.group(2)
        if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
            return chr(int(name[1:], 16))
        return _NAMED.get(name, "")
    if whole.startswith("\\*"):
        key = whole[2:].strip("[]")
        return _STRINGS.get(key, "")
    if m.group(3) is not None:
        return _ESCAPES.get(m.group(3), "")
    return ""


def inline(text: str) -> str:
    """Text with roff escapes resolved: fonts and sizes dropped, special characters spelled out."""
    return _ESC_RE.sub(_escape, text)


def _args(rest: str) -> list[str]:
    out, cur, quoted, i = [], "", False, 0
    while i < len(rest):
        ch = rest[i]
        if ch == '"':
            if quoted and i + 1 < len(rest) and rest[i + 1] == '"':
                cur += '"'
                i += 2
                continue
            quoted = not quoted
        elif ch in " \t" and not quoted:
            if cur:
                out.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    if cur:
        out.append(cur)
    return out


_MDOC_PREFIX = {"Fl": "-", "Cm": "", "Ar": "", "Op": "", "Xr": ""}
_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}


def _macro_text(name: str, rest: str) -> str:
    args = [inline(a) for a in _args(rest)]
    if name in _ALTERNATING:
        return "".join(args)
    if name == "Xr" and len(args) >= 2:
        return f"{args[0]}({args[1]})" + "".join(args[2:])
    if name == "Fl":
        return " ".join("-" + a if re.match(r"\w", a) else a for a in args) or "-"
    if name == "Op":
        return "[" + " ".join(a for a in args if a not in _MDOC_CALLABLE) + "]"
    return " ".join(a for a in args if a not in _MDOC_CALLABLE)


_MDOC_CALLABLE = {"Fl", "Ar", "Cm", "Op", "Oo", "Oc", "Xr", "Pa", "Ql", "Dq", "Sq", "Em", "Li", "Nm", "Ic", "Ns", "Ev", "Va", "Dv",
                  "Sy", "Tn", "Ux", "Pq", "Aq", "Bq", "Qq", "Ad", "An", "Fn", "Fa", "Ft", "Er", "Cd", "Lk", "Mt"}


def _cjk(ch: str) -> bool:
    return ord(ch) >= 0x2E80


def _join(parts: list[str]) -> str:
    """Join the input lines of one filled paragraph: a space between words, none between CJK text."""
    out = ""
    for p in parts:
        p = p.strip()
        if not p:
            continue
        if out and not (_cjk(out[-1]) and _cjk(p[0])):
            out += " "
        out += p
    return re.sub(r"[ \t]+", " ", out).strip()


def roff_to_text(source: str) -> list[str]:
    """Paragraphs of running text from a man page (man or mdoc macros), in reading order.

    Why: a language model should learn Japanese prose, not formatter requests; each request either
    contributes its text (headings, font macros, list items) or ends a paragraph.
    """
    paras: list[str] = []
    cur: list[str] = []
    skip_until: str | None = None
    table_format = False

    def flush() -> None:
        text = _join(cur)
        cur.clear()
        if text:
            paras.append(text)

    lines = source.replace("\r", "").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        while line.endswith("\\") and not line.endswith("\\\\") and i < len(lines):  # escaped newline
            line = line[:-1] + lines[i]
            i += 1
        if skip_until is not None:
            if line.strip().startswith(skip_until):
                skip_until = None
            continue
        if table_format:
            if line.rstrip().endswith("."):
                table_format = False
            continue
        if line.startswith((".\\\"", "'\\\"", "\\\"")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"[.'][ \t]*([^ \t]+)[ \t]*(.*)", line)
            if not m:
                continue
            name, rest = m.group(1), m.group(2)
            if name in ("de", "am", "ig"):
                skip_until = ".."
                continue
            if name == "TS":
                flush()
                table_format = True
                continue
            if name in _BREAK:
                flush()
            if name in _HEADINGS or name in ("TP", "IP", "It", "HP", "TQ"):
                text = _macro_text(name, rest) if name not in ("TP", "HP", "TQ") else ""
                if name == "IP":
                    args = _args(rest)
                    text = inline(args[0]) if args else ""
                if text:
                    cur.append(text)
                    if name in _HEADINGS:
                        flush()
                continue
            if name in _SKIP or name == "TH":
                continue
            text = _macro_text(name, rest)
            if text:
                cur.append(text)
            continue
        text = inline(line)
        if "\t" in line:  # table rows and tab-aligned lists: keep the row as one line
            flush()
            cur.append(text.replace("\t", " "))
            flush()
        elif not line.strip():
            flush()
        else:
            cur.append(text)
    flush()
    return paras


# ---------------------------------------------------------------- the Debian package


def fetch_deb(package: str, version: str, sha256: str, out: Path) -> None:
    """``apt-get download package=version`` into ``out``, refused unless its sha256 is the pinned one."""
    if shutil.which("apt-get") is None:
        raise WorkflowError(f"apt-get not found: fetching the corpus package {package}={version} needs a Debian/Ubuntu host")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        proc = subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=tmp, capture_output=True, text=True, check=False)
        debs = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or len(debs) != 1:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no .deb written"]
            raise WorkflowError(f"apt-get download {package}={version} failed: {tail[0]} (run apt-get update; is the version in your sources?)")
        got = sha256_file(debs[0])
        if got != sha256:
            raise WorkflowError(f"{debs[0].name}: sha256 {got} is not the pinned {sha256}")
        with atomic_path(out) as dst:
            shutil.move(debs[0], dst)


def deb_members(deb: Path) -> dict[str, bytes]:
    """Regular files of a .deb's data archive by path (``./usr/...``), read without dpkg.

    A .deb is an ``ar`` archive holding ``data.tar.{xz,gz,zst}``; xz and gz are what Debian uses
    for arch-all documentation packages, and both are in Python's standard library.
    """
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise WorkflowError(f"{deb} is not a Debian package (no ar header)")
    pos, data = 8, None
    while pos + 60 <= len(blob):
        name = blob[pos : pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48 : pos + 58].decode().strip())
        if name.startswith("data.tar"):
            data = (name, blob[pos + 60 : pos + 60 + size])
        pos += 60 + size + (size & 1)
    if data is None:
        raise WorkflowError(f"{deb} has no data.tar member")
    name, payload = data
    if name.endswith(".xz"):
        payload = lzma.decompress(payload)
    elif name.endswith(".gz"):
        payload = gzip.decompress(payload)
    elif name != "data.tar":
        raise WorkflowError(f"{deb}: {name} is not supported (allowed: data.tar, data.tar.xz, data.tar.gz)")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                out[member.name if member.name.startswith("./") else "./" + member.name] = tar.extractfile(member).read()
    return out


# ---------------------------------------------------------------- the split


def is_heldout(page: str, heldout_pct: int) -> bool:
    """Whether a page belongs to the held-out split: a hash of its path, so the split never moves."""
    return int(hashlib.sha256(page.encode()).hexdigest(), 16) % 100 < heldout_pct


def man_pages(members: dict[str, bytes]) -> dict[str, list[str]]:
    """Page path (``man1/ls.1``) -> its paragraphs, for every Japanese man page with text."""
    pages = {}
    for path, raw in sorted(members.items()):
        if not path.startswith(MAN_ROOT) or not path.endswith(".gz"):
            continue
        source = gzip.decompress(raw).decode("utf-8", errors="replace")
        if source.startswith(".so "):  # a page that only includes another one
            continue
        paras = [p.replace(PARAGRAPH_SEP, " ") for p in roff_to_text(source)]
        if paras:
            pages[path[len(MAN_ROOT) : -3]] = paras
    return pages


def prepare(deb: Path, package: str, heldout_pct: int, out_dir: Path) -> dict[str, Any]:
    """``train.txt``, ``heldout.txt`` (one page per line), ``copyright`` and ``corpus.json`` in ``out_dir``."""
    if not 1 <= heldout_pct <= 50:
        raise WorkflowError(f"heldout_pct {heldout_pct} is out of range; allowed: 1..50")
    members = deb_members(deb)
    pages = man_pages(members)
    if not pages:
        raise WorkflowError(f"{deb} holds no Japanese man pages under {MAN_ROOT}")
    split: dict[str, list[str]] = {"train": [], "heldout": []}
    for page in pages:
        split["heldout" if is_heldout(page, heldout_pct) else "train"].append(page)
    if not split["heldout"] or not split["train"]:
        raise WorkflowError(f"heldout_pct {heldout_pct} leaves a split empty ({len(pages)} pages)")
    licence = members.get(COPYRIGHT.format(package=package), b"").decode("utf-8", errors="replace")
    stats: dict[str, Any] = {"package": package, "deb": deb.name, "deb_sha256": sha256_file(deb), "heldout_pct": heldout_pct}
    with atomic_path(out_dir, "prepare_corpus", [deb]) as tmp:
        tmp.mkdir(parents=True)
        for name, names in split.items():
            text = "".join(PARAGRAPH_SEP.join(pages[p]) + "\n" for p in names)
            (tmp / f"{name}.txt").write_text(text, encoding="utf-8")
            stats[name] = {"pages": len(names), "characters": len(text), "bytes": len(text.encode()), "page_names": names}
        (tmp / "copyright").write_text(licence, encoding="utf-8")
        write_json(tmp / "corpus.json", stats)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    f = sub.add_parser("fetch", help="apt-get download the pinned package")
    f.add_argument("--package", required=True)
    f.add_argument("--version", required=True)
    f.add_argument("--sha256", required=True)
    f.add_argument("-o", "--output", required=True)
    p = sub.add_parser("prepare", help="plain text, train/held-out split")
    p.add_argument("deb")
    p.add_argument("--package", required=True)
    p.add_argument("--heldout-pct", type=int, default=5)
    p.add_argument("-o", "--output", required=True, help="output directory")
    a = ap.parse_args(argv)
    if a.verb == "fetch":
        out = Path(a.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        fetch_deb(a.package, a.version, a.sha256, out)
    else:
        stats = prepare(Path(a.deb), a.package, a.heldout_pct, Path(a.output))
        print({k: {kk: vv for kk, vv in v.items() if kk != "page_names"} if isinstance(v, dict) else v for k, v in stats.items()})
    return 0
