"""Every `--flag` the docs (README.md, docs/*.md) name must appear in at least one file under
tests/, so that no documented flag goes untested unnoticed.

Flags of other tools (torchrun, srun/sbatch, ...) are listed in OTHER_TOOLS with the tool's name.
Flags of the repository's own benchmark scripts (run by hand, never by the suite) are listed in
BENCHMARK_FLAGS with the script that must define them, and the check confirms it does.

    python scripts/check_docs_flags.py        # exit 0: all covered; 1: lists what is not
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")

# flags of programs that are not shardserve: flag -> the program
OTHER_TOOLS: dict[str, str] = {
    "--nproc-per-node": "torchrun",
    "--nnodes": "torchrun",
    "--ntasks-per-node": "srun / sbatch",
    "--kill-on-bad-exit": "srun",
    "--gpus-per-node": "sbatch",
}
# flags of the benchmark scripts under benchmarks/: flag -> the script that defines it
BENCHMARK_FLAGS: dict[str, str] = {
    "--params": "benchmarks/bench_serving.py",
    "--shapes": "benchmarks/bench_serving.py",
    "--new-tokens": "benchmarks/bench_serving.py",
}


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def documented_flags(root: Path = ROOT) -> dict[str, list[str]]:
    """flag -> the doc files (relative paths) that name it."""
    found: dict[str, list[str]] = {}
    for path in doc_files(root):
        for flag in sorted(set(FLAG_RE.findall(path.read_text(encoding="utf-8")))):
            found.setdefault(flag, []).append(str(path.relative_to(root)))
    return found


def test_texts(root: Path = ROOT) -> dict[str, str]:
    """relative path -> text of every file under tests/ (sources and data alike)."""
    out = {}
    for path in sorted((root / "tests").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            try:
                out[str(path.relative_to(root))] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
    return out


def mentioned(flag: str, text: str) -> bool:
    """`flag` occurs in `text` as a whole flag (`--shape` does not count inside `--shapes`)."""
    return re.search(re.escape(flag) + r"(?![\w-])", text) is not None


def problems(root: Path = ROOT) -> list[str]:
    """One line per documented flag that no test mentions (or that the allow-lists get wrong)."""
    flags = documented_flags(root)
    tests = test_texts(root)
    out = []
    for flag, docs in sorted(flags.items()):
        if flag in OTHER_TOOLS:
            continue
        if flag in BENCHMARK_FLAGS:
            script = root / BENCHMARK_FLAGS[flag]
            if not (script.is_file() and f'"{flag}"' in script.read_text(encoding="utf-8")):
                out.append(f"{flag} ({', '.join(docs)}): allow-listed as a flag of "
                           f"{BENCHMARK_FLAGS[flag]}, which does not define it")
            continue
        if not any(mentioned(flag, text) for text in tests.values()):
            out.append(f"{flag} ({', '.join(docs)}): no file under tests/ mentions it")
    for flag in sorted({*OTHER_TOOLS, *BENCHMARK_FLAGS} - set(flags)):
        out.append(f"{flag}: allow-listed but no doc names it any more (drop it from the list)")
    return out


def main() -> int:
    found = problems()
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} documented flag(s) without a test: add a test that shows the flag's "
              "effect, or take the flag out of the docs", file=sys.stderr)
        return 1
    print(f"ok: {len(documented_flags())} documented flags, each mentioned by a test or "
          "allow-listed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
