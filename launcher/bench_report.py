"""Turn raw benchmark results into figures (percentiles, shares, speedups) and write them:
JSON, CSV, a Markdown summary, PNG plots, and a fixed-width table for the terminal."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from launcher.bench_run import Workload, WorkloadRun

WORKLOAD_FIELDS = ["workload", "prompt_len", "output_len", "batch", "output_tokens", "elapsed_s",
                   "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                   "comm_share", "speedup", "error"]
LAYOUT_FIELDS = ["layout", "tp", "pp", "ranks", "status", "backend", "startup_s", "load_s",
                 "mem_kind", "mem_mb_max", "mem_mb_per_rank", "weights_mb_per_rank",
                 "kv_mb_per_rank", "layout_comm_share"]


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def comm_share(reports: list[dict[str, Any]], first: int, last: int) -> float | None:
    """Mean over ranks of (communication seconds / step seconds) over steps [first, last)."""
    shares = []
    for rep in reports:
        steps = rep["steps"][first:last]
        total = sum(s for s, _ in steps)
        if total > 0:
            shares.append(sum(c for _, c in steps) / total)
    return float(np.mean(shares)) if shares else None


def workload_row(w: Workload, run: WorkloadRun, reports: list[dict[str, Any]]) -> dict[str, Any]:
    tps = run.output_tokens / run.elapsed_s if run.elapsed_s > 0 else None
    return {"workload": w.label, "prompt_len": w.prompt_len, "output_len": w.output_len,
            "batch": w.batch, "output_tokens": run.output_tokens, "elapsed_s": run.elapsed_s,
            "tokens_per_s": tps, "ttft_p50_ms": pct(run.ttft_ms, 50),
            "ttft_p99_ms": pct(run.ttft_ms, 99), "itl_p50_ms": pct(run.itl_ms, 50),
            "itl_p99_ms": pct(run.itl_ms, 99),
            "comm_share": comm_share(reports, *run.steps) if reports[0]["steps"] else None,
            "speedup": None, "error": run.error}


def summarize_layout(tp: int, pp: int, raw: dict[str, Any] | None,
                     status: str = "ok", error: str | None = None) -> dict[str, Any]:
    """One layout's figures from rank 0's raw result (None for a failed or skipped layout)."""
    entry: dict[str, Any] = {"layout": f"{tp}x{pp}", "tp": tp, "pp": pp, "ranks": tp * pp,
                             "status": status, "error": error, "workloads": []}
    if raw is None:
        return entry
    reports = sorted(raw["ranks"], key=lambda r: r["rank"])
    steps = [r["steps"] for r in reports]
    entry.update(
        backend=raw.get("backend"), startup_s=raw.get("startup_s"),
        load_s=max(r["load_s"] for r in reports), mem_kind=reports[0]["mem_kind"],
        mem_mb_per_rank=[r["mem_mb"] for r in reports],
        mem_mb_max=max(r["mem_mb"] for r in reports),
        rss_mb_per_rank=[r["rss_mb"] for r in reports],
        weights_mb_per_rank=[r["weights_mb"] for r in reports],
        kv_mb_per_rank=[r["kv_mb"] for r in reports],
        hosts=sorted({r["host"] for r in reports}),
        layout_comm_share=comm_share(reports, 0, max(map(len, steps))) if steps[0] else None,
        workloads=[workload_row(w, run, reports) for w, run in raw["workloads"]],
    )
    return entry


def add_speedups(layouts: list[dict[str, Any]]) -> None:
    """Speedup of each workload's tokens/s against the 1x1 layout of the same run."""
    base = next((e for e in layouts if e["layout"] == "1x1" and e["status"] == "ok"), None)
    if base is None:
        return
    ref = {row["workload"]: row["tokens_per_s"] for row in base["workloads"]}
    for e in layouts:
        for row in e["workloads"]:
            b = ref.get(row["workload"])
            if b and row["tokens_per_s"]:
                row["speedup"] = 1.0 if e is base else row["tokens_per_s"] / b


def flat_rows(layouts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per layout x workload (a layout without workloads still gets a row)."""
    rows = []
    for e in layouts:
        head = {k: _cell(e.get(k)) for k in LAYOUT_FIELDS}
        for row in e["workloads"] or [{}]:
            rows.append({**head, **{k: _cell(row.get(k)) for k in WORKLOAD_FIELDS},
                         "error": _cell(row.get("error") or e.get("error"))})
    return rows


def _cell(v: Any) -> Any:
    if isinstance(v, list):
        return ";".join(f"{x:.1f}" if isinstance(x, float) else str(x) for x in v)
    return "" if v is None else v


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or v == "":
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table_rows(layouts: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["layout", "ranks", "workload", "load s", "TTFT p50/p99 ms", "ITL p50/p99 ms",
            "tok/s", "speedup", "mem MB (max rank)", "comm %"]
    body = []
    for e in layouts:
        if e["status"] != "ok":
            body.append([e["layout"], str(e["ranks"]), e["status"], *["-"] * 6,
                         (e["error"] or "")[:60]])
            continue
        for r in e["workloads"]:
            share = r["comm_share"]
            body.append([e["layout"], str(e["ranks"]), r["workload"], _fmt(e["load_s"], 2),
                         f"{_fmt(r['ttft_p50_ms'])}/{_fmt(r['ttft_p99_ms'])}",
                         f"{_fmt(r['itl_p50_ms'])}/{_fmt(r['itl_p99_ms'])}",
                         _fmt(r["tokens_per_s"]), _fmt(r["speedup"], 2),
                         _fmt(e["mem_mb_max"], 0),
                         _fmt(share * 100 if share is not None else None)
                         if not r["error"] else "error: " + r["error"][:40]])
    return head, body


def format_table(layouts: list[dict[str, Any]]) -> str:
    """Fixed-width table for the terminal."""
    head, body = table_rows(layouts)
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
             for row in [head, *body]]
    return "\n".join(lines)


def markdown(meta: dict[str, Any], layouts: list[dict[str, Any]]) -> str:
    head, body = table_rows(layouts)
    out = [f"# shardserve bench: {meta['model']}", "",
           f"{meta['date']} on {meta['host']} ({meta['device']}, torch {meta['torch']}); "
           f"load = slowest rank's weight load + KV allocation; memory = {meta['mem_kind']}; "
           "comm % = share of step time ranks spend blocked in communication (mean over ranks); "
           "speedup = tokens/s over the 1x1 layout of this run.", "",
           "| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(out) + "\n"


def write_all(out: Path, meta: dict[str, Any], layouts: list[dict[str, Any]]) -> list[Path]:
    """results.json, results.csv, summary.md and the plots; returns the paths written."""
    from launcher.bench_plots import plot_scaling, plot_throughput_latency

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.csv", out / "summary.md"]
    paths[0].write_text(json.dumps({"meta": meta, "layouts": layouts}, indent=1))
    rows = flat_rows(layouts)
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths[2].write_text(markdown(meta, layouts))
    paths.append(plot_throughput_latency(layouts, out / "throughput_latency.png"))
    paths.append(plot_scaling(layouts, out / "scaling.png"))
    return paths
