"""Measure one configuration point of one model: write a repository holding only that model
with the point's config.pbtxt (everything else linked to the original), serve it, drive it
with the load generator, stop it, and turn what was seen into figures."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from launcher.analyze_load import (
    LoadResult,
    ServerError,
    ServerProcess,
    llm_inputs,
    ordinary_inputs,
    run_llm_load,
    run_ordinary_load,
)
from launcher.analyze_space import (
    Point,
    apply_llm,
    apply_ordinary,
    is_llm,
    model_path,
    point_key,
    point_label,
    vocab_size,
)
from serving.config import config_text

log = logging.getLogger(__name__)


@dataclass
class Constraints:
    """The budgets a chosen point must meet (None: no limit)."""

    latency_p99_ms: float | None = None
    min_throughput: float | None = None
    max_memory_per_rank_mb: float | None = None

    def check(self, fig: dict[str, Any]) -> dict[str, bool]:
        """Per constraint, whether the figures meet it; `no_errors` always applies."""
        out = {"no_errors": fig["status"] == "ok" and not fig.get("errors")
               and bool(fig.get("requests"))}
        if self.latency_p99_ms is not None:
            out["latency_p99_ms"] = _le(fig.get("latency_p99_ms"), self.latency_p99_ms)
        if self.min_throughput is not None:
            t = fig.get("throughput")
            out["min_throughput"] = t is not None and t >= self.min_throughput
        if self.max_memory_per_rank_mb is not None:
            out["max_memory_per_rank_mb"] = _le(fig.get("mem_mb_max"),
                                                self.max_memory_per_rank_mb)
        return out

    def describe(self, name: str) -> str:
        if name == "latency_p99_ms":
            return f"latency p99 <= {self.latency_p99_ms:g} ms"
        if name == "min_throughput":
            return f"throughput >= {self.min_throughput:g}"
        if name == "max_memory_per_rank_mb":
            return f"memory per rank <= {self.max_memory_per_rank_mb:g} MB"
        return "every request succeeds"


def _le(value: float | None, limit: float) -> bool:
    return value is not None and value <= limit


@dataclass
class LoadSettings:
    """How each point is driven."""

    concurrency: int = 8
    duration_s: float = 10.0
    warmup_s: float = 1.0
    prompt_len: int = 32
    max_tokens: int = 16
    shapes: dict[str, list[int]] | None = None
    start_timeout_s: float = 300.0


def mirror(src: Path, dst: Path) -> None:
    """Recreate `src` at `dst` with hard links (copies across file systems): the server refuses
    symlinks that leave a repository, and hard links cost no space for big checkpoints."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for entry in src.iterdir():
            mirror(entry, dst / entry.name)
        return
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copy2(src.resolve(), dst)


def link_model(src: Path, dst: Path, config: mc.ModelConfig | None) -> None:
    """`dst` = a model folder whose config.pbtxt is `config` (None: the original's text) and
    whose other entries (version folders, files) mirror `src`'s."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name == "config.pbtxt":
            continue
        link = dst / entry.name
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        mirror(entry, link)
    text = (src / "config.pbtxt").read_text() if config is None else config_text(config)
    (dst / "config.pbtxt").write_text(text, encoding="utf-8")


class PointRunner:
    """Measures points of one model, memoized by point; every result lands in `results`."""

    def __init__(self, name: str, model_dir: Path, config: mc.ModelConfig, work: Path,
                 load: LoadSettings, constraints: Constraints) -> None:
        self.name, self.model_dir, self.config = name, model_dir, config
        self.work, self.load, self.constraints = work, load, constraints
        self.llm = is_llm(config)
        self.results: list[dict[str, Any]] = []
        self._seen: dict[str, dict[str, Any]] = {}
        if self.llm:
            self._vocab = vocab_size(model_path(config, model_dir))

    def config_for(self, point: Point) -> mc.ModelConfig:
        return apply_llm(self.config, point) if self.llm else apply_ordinary(self.config, point)

    def __call__(self, point: Point) -> dict[str, Any]:
        key = point_key(point)
        if key not in self._seen:
            self._seen[key] = self._measure(point, len(self.results))
            self.results.append(self._seen[key])
        return self._seen[key]

    def skipped(self, point: Point, reason: str) -> None:
        self.results.append(self._result(point, "skipped", reason))

    def _result(self, point: Point, status: str, error: str | None = None) -> dict[str, Any]:
        return {"model": self.name, "point": point, "label": point_label(point),
                "status": status, "error": error, "kind": "llm" if self.llm else "ordinary",
                "throughput_unit": "output tokens/s" if self.llm else "infer/s",
                "throughput": None, "meets": {}, "meets_all": False}

    def _measure(self, point: Point, index: int) -> dict[str, Any]:
        root = self.work / f"{self.name}-{index}"
        if root.exists():
            shutil.rmtree(root)
        link_model(self.model_dir, root / self.name, self.config_for(point))
        log.info("analyze %s: measuring %s", self.name, point_label(point))
        try:
            server = ServerProcess(root, self.work / f"{self.name}-{index}.log",
                                   self.load.start_timeout_s)
        except ServerError as e:
            res = self._result(point, "failed", str(e))
        else:
            try:
                load = self.drive(server.url)
            finally:
                mem = server.stop()
            res = self._figures(point, load, mem, server.startup_s)
        shutil.rmtree(root, ignore_errors=True)
        res["meets"] = self.constraints.check(res)
        res["meets_all"] = all(res["meets"].values())
        log.info("analyze %s: %s -> %s", self.name, point_label(point), _brief(res))
        return res

    def drive(self, url: str) -> LoadResult:
        """Run the load generator against a server that serves this model."""
        s = self.load
        if self.llm:
            inputs = llm_inputs(s.prompt_len, s.max_tokens, self._vocab)
            return run_llm_load(url, self.name, inputs, s.concurrency, s.duration_s, s.warmup_s)
        return run_ordinary_load(url, self.name, ordinary_inputs(self.config, s.shapes),
                                 s.concurrency, s.duration_s, s.warmup_s)

    def _figures(self, point: Point, load: LoadResult, mem: list[float], startup_s: float
                 ) -> dict[str, Any]:
        res = self._result(point, "ok")
        res.update(load.figures())
        # a giant model's ranks are the server's engine process and its workers; the front
        # process itself is no rank then, and is reported on its own
        ranks = mem[1:] if self.llm and len(mem) > 1 else mem
        per_rank = [round(m, 1) for m in ranks]
        res.update(startup_s=startup_s, mem_mb_per_rank=per_rank, mem_mb_front=round(mem[0], 1),
                   mem_mb_max=max(per_rank) if per_rank else None,
                   concurrency=self.load.concurrency)
        res["throughput"] = res["tokens_per_s"] if self.llm else res["infer_per_s"]
        if not load.requests:
            res["status"], res["error"] = "failed", load.first_error or "no request completed"
        return res


def _brief(res: dict[str, Any]) -> str:
    if res["status"] != "ok":
        return f"{res['status']}: {(res['error'] or '').splitlines()[0][:120]}"
    return (f"{res['throughput']:.1f} {res['throughput_unit']}, p99 "
            f"{res['latency_p99_ms']:.1f} ms, mem {res['mem_mb_max']:.0f} MB/rank, "
            f"errors {res['errors']}")
