"""The analyzer's output: the chosen point per model, report.json, report.md (every tried
point with its figures and which constraints it met) and one PNG chart per model
(throughput against p99 latency, the chosen point marked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.analyze_run import Constraints
from launcher.bench_plots import _pyplot
from launcher.bench_report import _fmt


def choose(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest-throughput measured point that meets every constraint (None: none does)."""
    ok = [r for r in results if r["status"] == "ok" and r["meets_all"]]
    return max(ok, key=lambda r: r["throughput"]) if ok else None


def unmet(results: list[dict[str, Any]], constraints: Constraints) -> str:
    """Why no point was chosen: the constraints no measured point met, else 'jointly'."""
    measured = [r for r in results if r["status"] == "ok"]
    if not measured:
        errors = [r["error"] for r in results if r.get("error")]
        return "no configuration could be measured" + (
            f" (first error: {errors[0].splitlines()[0][:200]})" if errors else "")
    names = list(measured[0]["meets"])
    never = [n for n in names if not any(r["meets"][n] for r in measured)]
    best = _closest(measured, never)
    if never:
        return ("no configuration meets " + " and ".join(constraints.describe(n) for n in never)
                + best)
    return ("no configuration meets all of " + ", ".join(constraints.describe(n) for n in names)
            + " at once" + best)


def _closest(measured: list[dict[str, Any]], never: list[str]) -> str:
    parts = []
    if "latency_p99_ms" in never:
        parts.append(f"lowest latency p99 measured: "
                     f"{min(r['latency_p99_ms'] for r in measured):.1f} ms")
    if "min_throughput" in never:
        r = max(measured, key=lambda r: r["throughput"] or 0)
        parts.append(f"highest throughput measured: {r['throughput']:.1f} {r['throughput_unit']}")
    if "max_memory_per_rank_mb" in never:
        parts.append(f"lowest memory per rank measured: "
                     f"{min(r['mem_mb_max'] for r in measured):.0f} MB")
    return f" ({'; '.join(parts)})" if parts else ""


TABLE_HEAD = ["#", "point", "status", "throughput", "lat p50/p99 ms", "TTFT p50/p99 ms",
              "requests", "errors", "mem MB/rank (max)", "startup s", "constraints", "chosen"]


def _row(i: int, r: dict[str, Any], chosen: dict[str, Any] | None,
         constraints: Constraints) -> list[str]:
    if r["status"] != "ok":
        reason = (r.get("error") or "").splitlines()[0][:90] if r.get("error") else ""
        return [str(i), r["label"], f"{r['status']}: {reason}", *["-"] * 8, ""]
    met = [("met " if ok else "MISSED ") + constraints.describe(n)
           for n, ok in r["meets"].items()]
    return [str(i), r["label"], "ok", f"{_fmt(r['throughput'])} {r['throughput_unit']}",
            f"{_fmt(r['latency_p50_ms'])}/{_fmt(r['latency_p99_ms'])}",
            f"{_fmt(r['ttft_p50_ms'])}/{_fmt(r['ttft_p99_ms'])}", str(r["requests"]),
            str(r["errors"]), _fmt(r["mem_mb_max"], 0), _fmt(r["startup_s"]), "; ".join(met),
            "**chosen**" if r is chosen else ""]


def model_section(name: str, entry: dict[str, Any], constraints: Constraints) -> list[str]:
    chosen = entry["chosen"]
    chart = f"; chart: `{entry['chart']}`" if entry.get("chart") else ""
    out = [f"## {name}", "", f"{entry['kind']} model, {entry['mode']} search, "
           f"{len(entry['results'])} points{chart}", ""]
    if entry.get("note"):
        out += [entry["note"], ""]
    if chosen is not None:
        out += [f"Chosen: **{chosen['label']}** ({_fmt(chosen['throughput'])} "
                f"{chosen['throughput_unit']}, latency p99 {_fmt(chosen['latency_p99_ms'])} ms, "
                f"memory {_fmt(chosen['mem_mb_max'], 0)} MB per rank).", ""]
    elif entry["results"]:
        out += [f"**Nothing chosen**: {entry['unmet']}; the original config.pbtxt was kept.", ""]
    if entry["results"]:
        out += ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "|".join("---" for _ in TABLE_HEAD)
                + "|"]
        out += ["| " + " | ".join(_row(i, r, chosen, constraints)) + " |"
                for i, r in enumerate(entry["results"])]
        out.append("")
    return out


def markdown(meta: dict[str, Any], models: dict[str, dict[str, Any]],
             constraints: Constraints) -> str:
    wanted = [constraints.describe(n) for n in ("latency_p99_ms", "min_throughput",
                                                "max_memory_per_rank_mb")
              if getattr(constraints, n) is not None] or ["none"]
    out = [f"# shardserve analyze: {meta['repository']}", "",
           f"{meta['date']} on {meta['host']} ({meta['cpus']} CPUs); concurrency "
           f"{meta['concurrency']}, {meta['duration_s']:g} s per point after "
           f"{meta['warmup_s']:g} s warm-up. Constraints: {', '.join(wanted)}. Throughput is "
           "infer/s for ordinary models and output tokens/s for giant models; latency is per "
           "request (a whole generation for giant models); memory is the peak RSS of each "
           "rank process (the server process is rank 0).", ""]
    for name, entry in models.items():
        out += model_section(name, entry, constraints)
    return "\n".join(out) + "\n"


def plot_model(name: str, entry: dict[str, Any], constraints: Constraints, path: Path) -> Path:
    """Throughput against p99 latency for every measured point; chosen point starred."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ok = [r for r in entry["results"] if r["status"] == "ok" and r["latency_p99_ms"] is not None]
    for meets, color, label in ((True, "tab:green", "meets constraints"),
                                (False, "tab:red", "misses a constraint")):
        pts = [r for r in ok if r["meets_all"] == meets]
        if pts:
            ax.scatter([r["latency_p99_ms"] for r in pts], [r["throughput"] for r in pts],
                       color=color, label=label, zorder=3)
    for i, r in enumerate(entry["results"]):  # "#i" = row i of report.md
        if r in ok:
            ax.annotate(f"#{i}", (r["latency_p99_ms"], r["throughput"]), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")
    chosen = entry["chosen"]
    if chosen is not None:
        ax.scatter([chosen["latency_p99_ms"]], [chosen["throughput"]], marker="*", s=400,
                   facecolors="none", edgecolors="black", linewidths=1.5, zorder=4,
                   label=f"chosen: {chosen['label']}")
    worst = max((r["latency_p99_ms"] for r in ok), default=0.0)
    budget = constraints.latency_p99_ms
    if budget is not None and budget <= 1.5 * worst:
        ax.axvline(budget, color="grey", linestyle="--", label="latency budget")
    elif budget is not None:  # far to the right: a line there would squash every point
        ax.plot([], [], " ", label=f"latency budget {budget:g} ms (off the chart)")
    if constraints.min_throughput is not None:
        ax.axhline(constraints.min_throughput, color="grey", linestyle=":",
                   label="minimum throughput")
    unit = entry["results"][0]["throughput_unit"] if entry["results"] else ""
    ax.set_xlabel("latency p99 (ms)")
    ax.set_ylabel(f"throughput ({unit})")
    ax.set_title(f"{name}: every tried configuration (#n: row n of report.md)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out: Path, meta: dict[str, Any], models: dict[str, dict[str, Any]],
                 constraints: Constraints) -> list[Path]:
    """report.json, report.md and `<model>_throughput_latency.png` per analyzed model."""
    paths = []
    for name, entry in models.items():
        if entry["results"]:
            entry["chart"] = f"{name}_throughput_latency.png"
            paths.append(plot_model(name, entry, constraints, out / entry["chart"]))
    doc = {"meta": meta, "constraints": constraints.__dict__,
           "models": {n: {**e, "chosen_index": _index(e)} for n, e in models.items()}}
    (out / "report.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "report.md").write_text(markdown(meta, models, constraints))
    return [out / "report.json", out / "report.md", *paths]


def _index(entry: dict[str, Any]) -> int | None:
    chosen = entry["chosen"]
    return next((i for i, r in enumerate(entry["results"]) if r is chosen), None)


def format_table(models: dict[str, dict[str, Any]], constraints: Constraints) -> str:
    """A compact fixed-width table of every point, for the terminal."""
    head = ["model", "point", "status", "throughput", "lat p99 ms", "mem MB", "meets", ""]
    body = []
    for name, entry in models.items():
        for r in entry["results"]:
            ok = r["status"] == "ok"
            body.append([name, r["label"], r["status"],
                         _fmt(r["throughput"]) if ok else "-",
                         _fmt(r.get("latency_p99_ms")) if ok else "-",
                         _fmt(r.get("mem_mb_max"), 0) if ok else "-",
                         "yes" if r["meets_all"] else "no",
                         "<- chosen" if r is entry["chosen"] else ""])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in [head, *body])
