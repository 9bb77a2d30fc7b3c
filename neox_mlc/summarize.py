"""Collect every quality.json of a model into ``summary.csv`` and a quality-vs-size plot.

Why: the question "how much worse is 4-bit?" is answered by one table and one picture: each
method's size (bits per parameter) against how far its next-token distributions drift from the
unquantized model (mean KL, log scale) and what that does to perplexity (ΔPPL).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from neox_mlc.common import atomic_path, check_output, read_json, run_cli

COLUMNS = [
    "method", "quantization", "bits_per_param", "params_bytes_on_disk", "ppl", "ppl_reference", "delta_ppl", "ppl_ratio",
    "kl_mean", "kl_p99", "top1_agreement_pct", "prefill_tok_s", "decode_tok_s", "peak_rss_gib",
]


def rows(reports: list[Path]) -> list[dict[str, Any]]:
    out = []
    for path in reports:
        q = read_json(path, "quality report")
        spd = q.get("speed_host_cpu", {})
        row = {c: q.get(c, "") for c in COLUMNS}
        row["prefill_tok_s"] = round(spd["prefill_tok_s"], 1) if spd else ""
        row["decode_tok_s"] = round(spd["decode_tok_s"], 1) if spd else ""
        out.append(row)
    return sorted(out, key=lambda r: (r["kl_mean"], r["method"]))


def write_csv(path: Path, table: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            for row in table:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot(path: Path, table: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for row in table:
        color = "tab:blue" if row["method"].startswith("mlc") else "tab:orange"
        for ax, key in ((ax1, "kl_mean"), (ax2, "delta_ppl")):
            ax.scatter(row["bits_per_param"], max(row[key], 1e-9) if key == "kl_mean" else row[key], color=color)
            ax.annotate(row["quantization"], (row["bits_per_param"], max(row[key], 1e-9) if key == "kl_mean" else row[key]), fontsize=8)
    ax1.set_yscale("log")
    ax1.set_xlabel("bits per parameter")
    ax1.set_ylabel("mean KL(reference ‖ quantized), nats")
    ax2.set_xlabel("bits per parameter")
    ax2.set_ylabel("Δ perplexity vs float32 reference")
    ax2.axhline(0, color="grey", lw=0.5)
    fig.suptitle(f"{title}: quality vs size (blue: this workflow's MLC modes, orange: gguf numpy peers)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--csv", required=True)
    ap.add_argument("--png", required=True)
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    for out in (a.csv, a.png):
        check_output(out, None, a.reports)
    table = rows([Path(p) for p in a.reports])
    write_csv(Path(a.csv), table)
    plot(Path(a.png), table, a.title)
    return 0


if __name__ == "__main__":
    run_cli(main)
