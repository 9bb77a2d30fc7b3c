"""``neox-mlc VERB ...``: one command for every step and user tool, verbs named like ``mlc_llm``'s.

Why: the rules call thin entry scripts, but a user (or the real-model benchmark) wants the same
steps and the chat/benchmark tools without knowing the repository layout. Each verb is its module's
own ``main(argv)``, so the CLI adds no behaviour of its own.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from neox_mlc.common import run_cli

# verb -> module whose ``main(argv)`` runs it
VERBS = {
    "fetch": "fetch_model",
    "generate": "make_tiny_model",
    "tokenizer": "make_tokenizer",
    "convert_weight": "convert_weight",
    "gen_config": "gen_config",
    "compile": "compile",
    "package": "package",
    "evaluate": "evaluate",
    "summarize": "summarize",
    "chat": "chat",
    "verify": "verify",
    "bench_convert": "bench_convert",
    "bench_runtime": "bench_runtime",
    "bench_verify": "bench_verify",
    "gpu_check": "gpu_check",
    "line_fixture": "line_fixture",
    "bench_line": "bench_line",
}


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in VERBS:
        usage = "usage: neox-mlc {" + ",".join(VERBS) + "} ..."
        if args and args[0] not in ("-h", "--help"):
            print(f"error: unknown verb {args[0]!r}; allowed: {', '.join(VERBS)}", file=sys.stderr)
            sys.exit(2)
        print(usage)
        return
    module = importlib.import_module(f"neox_mlc.{VERBS[args[0]]}")
    sys.argv[0] = f"neox-mlc {args[0]}"
    run_cli(module.main, args[1:])


if __name__ == "__main__":
    main()
