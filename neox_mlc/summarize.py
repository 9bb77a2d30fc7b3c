"""Collect every quality.json of a model into ``summary.csv``, a readable figure and ``summary.md`` with verdicts.

Why: the question "how much worse is 4-bit?" is answered by one table, one picture and one sentence
per mode. The picture is a dot plot with one row per method (so no two labels can collide, however
close their sizes): mean KL with its 95 % confidence interval and p99, ΔPPL with its interval, top-1
agreement, each axis saying which way is better, families told apart by marker and colour. The
sentences are generated from the numbers (never written by hand), and compare each MLC mode with the
llama.cpp quantizer of the nearest size pairwise, on the same evaluation chunks.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neox_mlc.common import atomic_path, check_output, read_json, run_cli
from neox_mlc.evaluate import BOOTSTRAP_SAMPLES

COLUMNS = [
    "method", "quantization", "family", "bits_per_param", "params_bytes_on_disk", "ppl", "ppl_reference", "delta_ppl",
    "delta_ppl_ci_low", "delta_ppl_ci_high", "ppl_ratio", "kl_mean", "kl_mean_ci_low", "kl_mean_ci_high", "kl_p99",
    "top1_agreement_pct", "scored_tokens", "prefill_tok_s", "decode_tok_s", "peak_rss_gib",
]  # fmt: skip
# family -> (legend label, colour, marker); unknown families get the last style
FAMILIES = {
    "mlc": ("this workflow, MLC formats", "tab:blue", "o"),
    "gguf": ("llama.cpp quantizers (gguf numpy)", "tab:orange", "s"),
    "llama.cpp": ("llama.cpp itself", "tab:green", "^"),
    "other": ("other", "tab:gray", "D"),
}


def family(method: str) -> str:
    head = method.split(" ", 1)[0]
    return head if head in FAMILIES else "other"


def rows(reports: list[Path]) -> list[dict[str, Any]]:
    """One row per report, sorted from the largest format to the smallest (then by drift)."""
    out = []
    for path in reports:
        q = read_json(path, "quality report")
        spd = q.get("speed_host_cpu", {})
        row: dict[str, Any] = {c: q.get(c, "") for c in COLUMNS}
        row["family"] = family(q["method"])
        row["delta_ppl_ci_low"], row["delta_ppl_ci_high"] = q.get("delta_ppl_ci95", ("", ""))
        row["kl_mean_ci_low"], row["kl_mean_ci_high"] = q.get("kl_mean_ci95", ("", ""))
        row["prefill_tok_s"] = round(spd["prefill_tok_s"], 1) if spd else ""
        row["decode_tok_s"] = round(spd["decode_tok_s"], 1) if spd else ""
        row["_chunks"] = q.get("chunks")
        row["_answers"] = q.get("answers", [])
        out.append(row)
    return sorted(out, key=lambda r: (-float(r["bits_per_param"]), r["kl_mean"], r["method"]))


def write_csv(path: Path, table: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in table:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


# ---------------------------------------------------------------- verdicts


def paired_ppl_difference(a: dict[str, Any], b: dict[str, Any], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float, float] | None:
    """PPL(a) − PPL(b) and its 95 % interval, resampling the chunks both were scored on (None if they differ)."""
    ca, cb = a.get("_chunks"), b.get("_chunks")
    if not ca or not cb or ca["tokens"] != cb["tokens"]:
        return None
    if not np.allclose(ca["nll_reference"], cb["nll_reference"], rtol=1e-4):  # not the same reference run
        return None
    tokens = np.asarray(ca["tokens"])
    na, nb = np.asarray(ca["nll"]), np.asarray(cb["nll"])
    idx = np.random.default_rng(seed).integers(0, len(tokens), size=(samples, len(tokens)))
    t = tokens[idx].sum(1)
    diff = np.exp(na[idx].sum(1) / t) - np.exp(nb[idx].sum(1) / t)
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return float(np.exp(na.sum() / tokens.sum()) - np.exp(nb.sum() / tokens.sum())), float(lo), float(hi)


def _signed(x: float) -> str:
    return f"{x:+.2g}".replace("-", "−")


def verdict(row: dict[str, Any], peers: list[dict[str, Any]]) -> str:
    """One sentence from the numbers: drift, top-1 changes, ΔPPL with its interval, and the nearest peer of each other family."""
    lo, hi = float(row["delta_ppl_ci_low"]), float(row["delta_ppl_ci_high"])
    if lo <= 0 <= hi:
        noise = "within noise of float32"
    else:
        noise = "measurably worse than float32" if lo > 0 else "measurably better than float32"
    pct = 100 * (float(row["ppl_ratio"]) - 1)
    text = (
        f"**{row['method']}** ({float(row['bits_per_param']):.2f} bits) costs {float(row['kl_mean']):.2g} nats/token,"
        f" changes the top token at {100 - float(row['top1_agreement_pct']):.1f} % of positions and moves perplexity by"
        f" {_signed(float(row['delta_ppl']))} [{_signed(lo)}, {_signed(hi)}] ({_signed(pct)} %): {noise}"
    )
    if row["family"] != "mlc":
        return text + "."
    # the nearest in size of each other family: the numpy quantizers, and llama.cpp itself where measured
    families = sorted({p["family"] for p in peers} - {row["family"]}, key=list(FAMILIES).index)
    for fam in families:
        same = [p for p in peers if p["family"] == fam]
        peer = min(same, key=lambda p: abs(float(p["bits_per_param"]) - float(row["bits_per_param"])))
        diff = paired_ppl_difference(row, peer)
        if diff is not None:
            d, dlo, dhi = diff
            rel = "within noise of" if dlo <= 0 <= dhi else ("worse than" if dlo > 0 else "better than")
            text += f", {rel} {peer['method']} (PPL {_signed(d)} [{_signed(dlo)}, {_signed(dhi)}])"
        else:
            ratio = float(row["kl_mean"]) / max(float(peer["kl_mean"]), 1e-30)
            text += f", KL ×{ratio:.2g} that of {peer['method']}"
    return text + "."


# ---------------------------------------------------------------- the figure


def _err(value: float, low: float, high: float) -> list[list[float]]:
    """Error-bar extents of a bootstrap interval around ``value``.

    Why clipped: a percentile interval over chunks can miss the pooled estimate by a hair (chunks
    differ in size, and KL is clamped at 1e-12 for the log axis); matplotlib refuses negative extents.
    """
    return [[max(value - low, 0.0)], [max(high - value, 0.0)]]


def _label(row: dict[str, Any]) -> str:
    return f"{row['method']}  ·  {float(row['bits_per_param']):.2f} bits"


def plot(path: Path, table: list[dict[str, Any]], title: str, subtitle: str = "") -> Any:
    """The dot plot; returns the figure's text extents check input (labels) for tests via ``label_boxes``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.lines import Line2D

    n = len(table)
    fig, axes = plt.subplots(1, 3, sharey=True, figsize=(13, 1.6 + 0.42 * n), gridspec_kw={"width_ratios": [1.25, 1.1, 0.9]})
    y = np.arange(n)[::-1]
    for row, yi in zip(table, y, strict=True):
        _, color, marker = FAMILIES[row["family"]]
        kl, p99 = max(float(row["kl_mean"]), 1e-12), max(float(row["kl_p99"]), 1e-12)
        if row["kl_mean_ci_low"] != "":
            klo, khi = max(float(row["kl_mean_ci_low"]), 1e-12), max(float(row["kl_mean_ci_high"]), 1e-12)
            axes[0].errorbar(kl, yi, xerr=_err(kl, klo, khi), fmt=marker, color=color, capsize=3, ms=7)
        else:
            axes[0].plot(kl, yi, marker, color=color, ms=7)
        axes[0].plot(p99, yi, marker, mfc="none", color=color, ms=7)
        d = float(row["delta_ppl"])
        if row["delta_ppl_ci_low"] != "":
            dlo, dhi = float(row["delta_ppl_ci_low"]), float(row["delta_ppl_ci_high"])
            axes[1].errorbar(d, yi, xerr=_err(d, dlo, dhi), fmt=marker, color=color, capsize=3, ms=7)
        else:
            axes[1].plot(d, yi, marker, color=color, ms=7)
        axes[2].plot(float(row["top1_agreement_pct"]), yi, marker, color=color, ms=7)
    for ax in axes:
        ax.xaxis.labelpad = 8
    axes[0].set_xscale("log")
    axes[0].xaxis.set_major_locator(matplotlib.ticker.LogLocator(numticks=6))
    for ax in axes[1:]:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=5))
    axes[0].set_xlabel("KL(reference ‖ mode), nats/token, log scale\n← better (filled: mean with 95 % CI; hollow: p99)")
    axes[1].axvline(0, color="grey", lw=0.8)
    axes[1].set_xlabel("Δ perplexity vs float32 reference\n← better (bars: 95 % bootstrap CI over chunks)")
    axes[2].set_xlabel("top-1 agreement with reference, %\nbetter →")
    axes[0].set_yticks(y, [_label(r) for r in table])
    axes[0].set_ylim(-0.7, n - 0.3)
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
        for yi in y[1::2]:
            ax.axhspan(yi - 0.5, yi + 0.5, color="0.95", zorder=0)
    present = [f for f in FAMILIES if any(r["family"] == f for r in table)]
    handles = [Line2D([], [], ls="", marker=FAMILIES[f][2], color=FAMILIES[f][1], ms=7, label=FAMILIES[f][0]) for f in present]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"{title}: quality of each mode against the float32 reference" + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.subplots_adjust(wspace=0.22)  # room for the outermost tick labels of neighbouring panels
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return fig


def label_boxes(fig: Any) -> list[tuple[str, Any]]:
    """Screen extents of every text drawn on the figure: tick labels inside each axis' view, axis labels, legend, title.

    Why: the overlap test must see what a reader sees; matplotlib keeps Text objects for ticks
    outside the view limits, which are never drawn.
    """
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = []
    for ax in fig.axes:
        for axis, (lo, hi) in ((ax.xaxis, sorted(ax.get_xlim())), (ax.yaxis, sorted(ax.get_ylim()))):
            for tick in axis.get_major_ticks():
                if lo <= tick.get_loc() <= hi and tick.label1.get_visible():
                    texts.append(tick.label1)
        texts += [ax.xaxis.label, ax.yaxis.label, ax.title, *ax.texts]  # ax.texts: annotations
    texts += [t for legend in fig.legends for t in legend.get_texts()]
    if fig._suptitle is not None:
        texts.append(fig._suptitle)
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


# ---------------------------------------------------------------- markdown


def _ci(row: dict[str, Any], key: str, fmt: str) -> str:
    lo, hi = row.get(f"{key}_ci_low", ""), row.get(f"{key}_ci_high", "")
    value = format(float(row[key]), fmt)
    return value if lo == "" else f"{value} [{format(float(lo), fmt)}, {format(float(hi), fmt)}]"


def markdown(table: list[dict[str, Any]], title: str, baseline: dict[str, Any] | None, training: dict[str, Any] | None) -> str:
    """Table, verdicts and side-by-side greedy answers, ready to paste into the README."""
    lines = [f"# {title}: quality of each mode", ""]
    ref = table[0]
    head = f"Float32 reference perplexity on the held-out text: **{float(ref['ppl_reference']):.4g}** over {ref['scored_tokens']} tokens"
    if baseline:
        lo, hi = baseline["ppl_unigram_ci95"]
        head += f"; unigram baseline (training-text token counts): **{baseline['ppl_unigram']:.4g}** [{lo:.4g}, {hi:.4g}]"
    lines += [head + ".", ""]
    if training:
        s = training["spec"]
        lines += [
            (f"Model: GPT-NeoX, {training['parameters']:,} parameters (hidden {s['hidden_size']}, {s['num_layers']} layers,"
            f" {s['num_heads']} heads, vocab {s['vocab_size']}, tied embeddings, sequential residual, full rotary);"
            f" trained {s['steps']} steps × {s['batch_size']} × {s['seq_len']} tokens ({training['epochs']:.2f} epochs of"
            f" {training['training_tokens']:,} tokens) in {training['wall_s']:.0f} s wall, {training['cpu_s']:.0f} s CPU"
            f" ({training['torch_threads']} threads); loss {training['loss_curve'][0]:.2f} → {np.mean(training['loss_curve'][-20:]):.2f}."),
            "",
        ]
    lines += [
        "| method | bits/param | mean KL [95 % CI] | p99 KL | top-1 agree | ΔPPL [95 % CI] | prefill / decode tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        speed = f"{r['prefill_tok_s']} / {r['decode_tok_s']}" if r["prefill_tok_s"] != "" else ""
        lines.append(
            f"| {r['method']} | {float(r['bits_per_param']):.2f} | {_ci(r, 'kl_mean', '.3g')} | {float(r['kl_p99']):.3g} |"
            f" {float(r['top1_agreement_pct']):.1f} % | {_ci(r, 'delta_ppl', '+.3g')} | {speed} |"
        )
    lines += ["", "## Verdicts", ""]
    lines += [f"- {verdict(r, table)}" for r in table]
    prompts = [a["prompt"] for a in next((r["_answers"] for r in table if r["_answers"]), [])]
    if prompts:
        lines += ["", "## Greedy answers (LINE template, same prompt for every mode)", ""]
        for i, p in enumerate(prompts):
            lines += [f"**{p}**", "", "| mode | answer |", "|---|---|"]
            reference = next(r["_answers"][i]["reference"] for r in table if len(r["_answers"]) > i)
            lines.append(f"| float32 reference | {_cell(reference)} |")
            lines += [f"| {r['method']} | {_cell(r['_answers'][i]['bundle'])} |" for r in table if len(r["_answers"]) > i]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "(empty)"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--csv", required=True)
    ap.add_argument("--png", required=True)
    ap.add_argument("--markdown", help="summary.md: table, one verdict per mode, greedy answers side by side")
    ap.add_argument("--baseline", help="unigram.json of the evaluation text")
    ap.add_argument("--training", help="training.json of a model trained by the workflow")
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    for out in (a.csv, a.png):
        check_output(out, None, a.reports)
    table = rows([Path(p) for p in a.reports])
    baseline = read_json(a.baseline, "unigram baseline") if a.baseline else None
    training = read_json(a.training, "training record") if a.training else None
    write_csv(Path(a.csv), table)
    subtitle = f"float32 reference perplexity {float(table[0]['ppl_reference']):.4g} on held-out text"
    if baseline:
        subtitle += f" (unigram baseline {baseline['ppl_unigram']:.4g}: {'learned' if table[0]['ppl_reference'] < baseline['ppl_unigram'] else 'NOT better than unigram'})"
    fig = plot(Path(a.png), table, a.title, subtitle)
    import matplotlib.pyplot as plt

    plt.close(fig)
    if a.markdown:
        with atomic_path(a.markdown) as tmp:
            tmp.write_text(markdown(table, a.title, baseline, training), encoding="utf-8")
    return 0


if __name__ == "__main__":
    run_cli(main)
