"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(layouts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in layouts if e["status"] == "ok"]


def plot_throughput_latency(layouts: list[dict[str, Any]], path: Path) -> Path:
    """Per layout, output tokens/s against ITL p50 and TTFT p99 over the workloads."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "itl_p50_ms", "inter-token latency p50 (ms)"),
                           (axes[1], "ttft_p99_ms", "time to first token p99 (ms)")):
        for e in _ok(layouts):
            rows = sorted((r for r in e["workloads"] if r["tokens_per_s"] and r[key] is not None),
                          key=lambda r: (r["batch"], r["prompt_len"], r["output_len"]))
            if not rows:
                continue
            xs, ys = [r[key] for r in rows], [r["tokens_per_s"] for r in rows]
            ax.plot(xs, ys, marker="o", label=f"tp{e['tp']} x pp{e['pp']}")
            for r, x, y in zip(rows, xs, ys, strict=True):
                ax.annotate(r["workload"], (x, y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("output tokens/s")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle("throughput vs latency per layout (labels: prompt:output:batch)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_scaling(layouts: list[dict[str, Any]], path: Path) -> Path:
    """Speedup over 1x1 against the number of ranks, one line per workload; ideal dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ok = sorted(_ok(layouts), key=lambda e: (e["ranks"], e["pp"]))
    labels = sorted({r["workload"] for e in ok for r in e["workloads"]})
    for label in labels:
        pts = [(e["ranks"], r["speedup"], e["layout"]) for e in ok for r in e["workloads"]
               if r["workload"] == label and r["speedup"] is not None]
        if not pts:
            continue
        best = {n: max(y for x, y, _ in pts if x == n) for n in sorted({p[0] for p in pts})}
        line = ax.plot(list(best), list(best.values()), label=f"{label} (best layout)")[0]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=line.get_color())
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
    most = max([e["ranks"] for e in ok] + [1])
    ax.plot([1, most], [1, most], linestyle="--", color="grey", label="ideal")
    ax.set_xlabel("ranks (tp x pp)")
    ax.set_ylabel("speedup vs tp=1, pp=1 (tokens/s)")
    ax.set_title("scaling with the number of ranks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="prompt:output:batch", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
