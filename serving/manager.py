"""Model lifecycle on the front: load, reload, unload, version selection, readiness, and the
per-version statistics that Triton's ModelStatistics reports."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from serving.backends import create_model
from serving.ensemble import ManagerResolver
from serving.metrics import ServerMetrics
from serving.repository import ModelRepository, select_versions
from serving.security import check_model_files, check_model_folder
from serving.types import Backend, InferRequest, InferResponse, ResponseSink, ServingError

log = logging.getLogger(__name__)
Factory = Callable[[mc.ModelConfig, Path, int], Backend]


@dataclass
class VersionStats:
    """Counters and summed durations (ns) in ModelStatistics' terms; thread-safe."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    success: list[int] = field(default_factory=lambda: [0, 0])
    fail: list[int] = field(default_factory=lambda: [0, 0])
    queue: list[int] = field(default_factory=lambda: [0, 0])
    compute: list[int] = field(default_factory=lambda: [0, 0])
    last_inference_ms: int = 0

    def record(self, request: InferRequest, ok: bool) -> None:
        now = time.monotonic_ns()
        start = request.compute_start_ns or request.arrival_ns
        with self.lock:
            self.last_inference_ms = int(time.time() * 1000)
            bucket = self.success if ok else self.fail
            bucket[0] += 1
            bucket[1] += now - request.arrival_ns
            if ok:
                self.queue[0] += 1
                self.queue[1] += max(0, start - request.arrival_ns)
                self.compute[0] += 1
                self.compute[1] += now - start

    def to_proto(self, name: str, version: int) -> pb.ModelStatistics:
        with self.lock:
            s = pb.ModelStatistics(name=name, version=str(version),
                                   last_inference=self.last_inference_ms,
                                   inference_count=self.success[0],
                                   execution_count=self.success[0])
            st = s.inference_stats
            for target, (count, ns) in ((st.success, self.success), (st.fail, self.fail),
                                        (st.queue, self.queue), (st.compute_infer, self.compute)):
                target.count, target.ns = count, ns
            # perf_analyzer wants equal compute counts; input/output staging is inside infer
            st.compute_input.count = st.compute_output.count = self.compute[0]
        return s


@dataclass
class LoadedVersion:
    version: int
    backend: Backend
    stats: VersionStats = field(default_factory=VersionStats)
    # submits in progress and whether the version was replaced: a retired version takes no
    # new request (they go to the version now serving), so reloads lose no request
    active: int = 0
    retired: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)


@dataclass
class ModelState:
    name: str
    state: str = "UNAVAILABLE"  # READY | LOADING | UNLOADING | UNAVAILABLE
    reason: str = ""
    config: mc.ModelConfig | None = None
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # serializes load/unload


class StatsSink:
    """Passes responses on and records the request's outcome when its final response goes."""

    def __init__(self, inner: ResponseSink, request: InferRequest, stats: VersionStats) -> None:
        self.inner, self.request, self.stats = inner, request, stats
        self.failed = False

    def send(self, response: InferResponse | None, final: bool) -> None:
        if response is not None and response.error is not None:
            self.failed = True
        try:
            self.inner.send(response, final)
        finally:
            if final:
                self.stats.record(self.request, not self.failed)


class ModelManager:
    """Every model of one repository and its loaded versions."""

    def __init__(self, repository: ModelRepository, control_mode: str = "none",
                 factory: Factory | None = None, metrics: ServerMetrics | None = None) -> None:
        if control_mode not in ("none", "explicit", "poll"):
            raise ValueError(f"model control mode {control_mode!r}: choose none, explicit or "
                             "poll")
        self.repository = repository
        self.control_mode = control_mode
        resolver = ManagerResolver(self.get, self.submit)
        self.factory: Factory = factory or (lambda c, d, v: create_model(c, d, v, resolver))
        self.metrics = metrics
        self._models: dict[str, ModelState] = {}
        self._lock = threading.Lock()

    def _state(self, name: str) -> ModelState:
        self.repository.model_dir(name)  # refuses names that leave the repository
        with self._lock:
            return self._models.setdefault(name, ModelState(name))

    # --- lifecycle --------------------------------------------------------------------------
    def load(self, name: str, config: mc.ModelConfig | None = None) -> None:
        """Load (or reload) every version the policy selects. A failed reload keeps the old
        versions serving; the error is raised and kept as the model's reason."""
        if not self.repository.exists(name) and config is None:
            raise ServingError("NOT_FOUND", f"model '{name}' is not in the repository "
                               f"{self.repository.root}")
        st = self._state(name)
        with st.lock:
            st.state, st.reason = "LOADING", ""
            try:
                cfg = config if config is not None else self.repository.config(name)
                fresh = self._load_versions(name, cfg)
            except ServingError as e:
                st.state = "READY" if st.versions else "UNAVAILABLE"
                st.reason = e.message
                log.error("model %s failed to load: %s", name, e.message)
                raise
            except Exception as e:  # a backend bug must not take the server down
                st.state = "READY" if st.versions else "UNAVAILABLE"
                st.reason = f"{type(e).__name__}: {e}"
                log.exception("model %s failed to load", name)
                raise ServingError("INTERNAL", f"model '{name}' failed to load: {st.reason}"
                                   ) from e
            old, st.versions, st.config = st.versions, fresh, cfg
            st.state = "READY"
        self._retire(list(old.values()))
        log.info("model %s ready (versions %s)", name, sorted(fresh))

    def _load_versions(self, name: str, cfg: mc.ModelConfig) -> dict[int, LoadedVersion]:
        model_dir = self.repository.model_dir(name)
        check_model_folder(model_dir, self.repository.root)
        versions = select_versions(cfg, self.repository.versions(name))
        loaded: dict[int, LoadedVersion] = {}
        try:
            for v in versions:
                check_model_files(cfg, model_dir, v, self.repository.root)
                backend = self.factory(cfg, model_dir, v)
                backend.load()
                loaded[v] = LoadedVersion(v, backend)
                if self.metrics is not None:
                    self.metrics.track(name, v, backend)
        except BaseException:
            self._retire(list(loaded.values()))
            raise
        return loaded

    def _retire(self, versions: list[LoadedVersion]) -> None:
        for lv in versions:
            with lv.cond:  # no submit may reach the backend once it starts unloading
                lv.retired = True
                lv.cond.wait_for(lambda lv=lv: lv.active == 0)
            if self.metrics is not None and lv.backend.config.name:
                self.metrics.track(lv.backend.config.name, lv.version, None)
            try:
                lv.backend.unload()
            except Exception:
                log.exception("unloading version %d failed", lv.version)

    def unload(self, name: str) -> None:
        st = self._state(name)
        with st.lock:
            if st.state != "READY" and not st.versions:
                raise ServingError("NOT_FOUND", f"model '{name}' is not loaded")
            st.state = "UNLOADING"
            old, st.versions = st.versions, {}
            self._retire(list(old.values()))
            st.state, st.reason = "UNAVAILABLE", "unloaded"
        log.info("model %s unloaded", name)

    def load_startup(self, names: list[str] | None) -> list[str]:
        """Load the startup models (all of them for control mode none); return failures."""
        failed = []
        for name in self._dependency_order(self.repository.names() if names is None else names):
            try:
                self.load(name)
            except ServingError as e:
                failed.append(f"{name}: {e.message}")
        return failed

    def _dependency_order(self, names: list[str]) -> list[str]:
        """Ensembles after the models their steps use (so that they resolve at load)."""
        def is_ensemble(name: str) -> bool:
            try:
                return self.repository.config(name).platform == "ensemble"
            except ServingError:
                return False

        flags = {name: is_ensemble(name) for name in names}
        return [n for n in names if not flags[n]] + [n for n in names if flags[n]]

    def close(self) -> None:
        with self._lock:
            states = list(self._models.values())
        for st in states:
            with st.lock:
                old, st.versions = st.versions, {}
                st.state = "UNAVAILABLE"
            self._retire(list(old.values()))

    # --- serving ----------------------------------------------------------------------------
    def get(self, name: str, version: str = "") -> tuple[ModelState, LoadedVersion]:
        """The model's state and the version a request goes to ("" = highest loaded)."""
        with self._lock:
            st = self._models.get(name)
        if st is None or not st.versions:
            if st is None and not self.repository.exists(name):
                raise ServingError("NOT_FOUND", f"unknown model '{name}'")
            why = f": {st.reason}" if st is not None and st.reason else ""
            raise ServingError("UNAVAILABLE", f"model '{name}' is not loaded{why}")
        versions = st.versions
        if not version:
            return st, versions[max(versions)]
        if not version.isdigit() or int(version) not in versions:
            raise ServingError("NOT_FOUND", f"model '{name}' has no loaded version {version!r}; "
                               f"loaded: {sorted(versions)}")
        return st, versions[int(version)]

    def _enter(self, lv: LoadedVersion, request: InferRequest) -> LoadedVersion:
        """Count a submit on `lv`, or on the version now serving if `lv` was replaced."""
        while True:
            with lv.cond:
                if not lv.retired:
                    lv.active += 1
                    return lv
            st, current = self.get(request.model_name, "")
            if lv.version in st.versions:
                current = st.versions[lv.version]
            request.model_version = str(current.version)
            lv = current

    def _exit(self, lv: LoadedVersion) -> None:
        with lv.cond:
            lv.active -= 1
            lv.cond.notify_all()

    def submit(self, lv: LoadedVersion, request: InferRequest, sink: ResponseSink) -> None:
        """Hand a request to a backend; its outcome lands in the version's statistics."""
        try:
            lv = self._enter(lv, request)
        except ServingError as e:
            sink.send(InferResponse(error=e), True)
            return
        try:
            self._submit(lv, request, sink)
        finally:
            self._exit(lv)

    def _submit(self, lv: LoadedVersion, request: InferRequest, sink: ResponseSink) -> None:
        cfg = lv.backend.config
        if self.metrics is not None:
            generative = cfg.model_transaction_policy.decoupled or cfg.backend == "shardserve_llm"
            sink = self.metrics.wrap(sink, request, cfg.name, lv.version, cfg.max_batch_size,
                                     generative)
        stats_sink = StatsSink(sink, request, lv.stats)
        try:
            lv.backend.submit(request, stats_sink)
        except ServingError as e:
            stats_sink.send(InferResponse(error=e), True)
        except Exception as e:
            log.exception("backend of %s failed on submit", request.model_name)
            stats_sink.send(InferResponse(error=ServingError("INTERNAL", f"{type(e).__name__}: "
                                                             f"{e}")), True)

    def ready(self, name: str, version: str = "") -> bool:
        try:
            _, lv = self.get(name, version)
        except ServingError:
            return False
        return lv.backend.ready()

    def all_ready(self) -> bool:
        with self._lock:
            states = list(self._models.values())
        return all(lv.backend.ready() for st in states for lv in list(st.versions.values()))

    def failure(self) -> str | None:
        """The first fatal backend failure, if any (the server exits on one)."""
        with self._lock:
            states = list(self._models.values())
        for st in states:
            for lv in list(st.versions.values()):
                why = lv.backend.failure()
                if why:
                    return f"model '{st.name}' version {lv.version}: {why}"
        return None

    def statistics(self, name: str = "", version: str = "") -> list[pb.ModelStatistics]:
        if name:
            _, lv = self.get(name, version)
            return [lv.stats.to_proto(name, lv.version)]
        with self._lock:
            states = sorted(self._models.values(), key=lambda s: s.name)
        return [lv.stats.to_proto(st.name, lv.version)
                for st in states for lv in sorted(st.versions.values(), key=lambda x: x.version)]

    def index(self, ready_only: bool = False) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        out = []
        for name in self.repository.names():
            with self._lock:
                st = self._models.get(name)
            if st is not None and st.versions:
                for v in sorted(st.versions):
                    out.append(pb.RepositoryIndexResponse.ModelIndex(
                        name=name, version=str(v), state=st.state, reason=st.reason))
            elif not ready_only:
                out.append(pb.RepositoryIndexResponse.ModelIndex(
                    name=name, state=st.state if st else "UNAVAILABLE",
                    reason=st.reason if st else ""))
        return out
