"""Ensembles: `ensemble_scheduling` steps wired by `input_map`/`output_map`, run as a dataflow
graph. A step starts as soon as all its input tensors exist, so independent steps run
concurrently; each response of a decoupled step (e.g. the LLM streaming tokens) flows on through
the downstream steps on its own, and reaches the client as its own streamed response.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from serving.tensor_config import select_outputs, validate_request
from serving.types import Backend, InferRequest, InferResponse, ResponseSink, ServingError

Resolver = Callable[[str, int], Backend]
"""(model name, version or -1 for the serving version) -> a loaded Backend; ServingError if none."""


class _Context:
    """The tensors one path through the graph has produced; children fork at decoupled steps."""

    def __init__(self, parent: _Context | None = None,
                 tensors: dict[str, np.ndarray] | None = None, launched: set[int] | None = None):
        self.parent = parent
        self.index = len(parent.children) if parent is not None else 0
        self.buffer: dict[int, InferResponse] = {}
        self.cursor = 0
        self.tensors = dict(tensors or {})
        self.launched = set(launched or ())
        self.children: list[_Context] = []
        self.emitted = False

    def lookup(self, name: str) -> np.ndarray | None:
        ctx: _Context | None = self
        while ctx is not None:
            if name in ctx.tensors:
                return ctx.tensors[name]
            ctx = ctx.parent
        return None

    def was_launched(self, step: int) -> bool:
        ctx: _Context | None = self
        while ctx is not None:
            if step in ctx.launched:
                return True
            ctx = ctx.parent
        return False


class _StepSink:
    """Routes one step's responses back into the run."""

    def __init__(self, run: _EnsembleRun, step: int, ctx: _Context) -> None:
        self._run, self._step, self._ctx = run, step, ctx

    def send(self, response: InferResponse | None, final: bool) -> None:
        self._run.on_response(self._step, self._ctx, response, final)


class _EnsembleRun:
    """One ensemble request in flight."""

    def __init__(self, owner: EnsembleBackend, request: InferRequest, sink: ResponseSink,
                 done: Callable[[], None]) -> None:
        self._owner = owner
        self._steps = list(owner.config.ensemble_scheduling.step)
        self._request = request
        self._sink = sink
        self._done = done
        self._lock = threading.Lock()
        self._inflight = 0
        self._failed = False
        self._finished = False
        self._root = _Context(tensors=request.inputs)
        self._last: InferResponse | None = None

    def start(self) -> None:
        self._advance(self._root)

    def _ready_steps(self, ctx: _Context) -> list[tuple[int, _Context]]:
        """Steps of `ctx` (and its children) whose inputs now exist; marks them launched."""
        ready = []
        for index, step in enumerate(self._steps):
            if ctx.was_launched(index):
                continue
            if all(ctx.lookup(t) is not None for t in step.input_map.values()):
                ctx.launched.add(index)
                self._inflight += 1
                ready.append((index, ctx))
        for child in ctx.children:
            ready.extend(self._ready_steps(child))
        return ready

    def _advance(self, ctx: _Context) -> None:
        with self._lock:
            if self._failed:
                return
            ready = self._ready_steps(ctx)
            self._collect_outputs(ctx)
            finished = self._inflight == 0
        for index, step_ctx in ready:
            self._launch(index, step_ctx)
        if finished:
            self._finish()

    def _launch(self, index: int, ctx: _Context) -> None:
        step = self._steps[index]
        sink = _StepSink(self, index, ctx)
        try:
            backend = self._owner.resolve(step.model_name, step.model_version)
        except ServingError as err:
            sink.send(InferResponse(error=err), True)
            return
        request = InferRequest(
            model_name=step.model_name,
            model_version=str(step.model_version) if step.model_version > 0 else "",
            inputs={name: ctx.lookup(tensor) for name, tensor in step.input_map.items()},
            id=self._request.id, requested_outputs=list(step.output_map),
            parameters=dict(self._request.parameters), priority=self._request.priority,
            timeout_us=self._request.timeout_us, cancelled=self._request.cancelled)
        backend.submit(request, sink)

    def on_response(self, index: int, ctx: _Context, response: InferResponse | None,
                    final: bool) -> None:
        step = self._steps[index]
        target = ctx
        if response is not None and response.error is not None:
            self._fail(response.error, step.model_name)
        elif response is not None:
            outputs = {step.output_map[k]: v for k, v in response.outputs.items()
                       if k in step.output_map}
            with self._lock:
                if self._owner.step_decoupled(index):
                    target = _Context(ctx, outputs, {index})
                    ctx.children.append(target)
                else:
                    ctx.tensors.update(outputs)
        if final:
            with self._lock:
                self._inflight -= 1
        self._advance(target)

    def _collect_outputs(self, ctx: _Context) -> None:
        """Answer for every context under `ctx` that now holds all ensemble outputs."""
        names = [o.name for o in self._owner.config.output]
        if not ctx.emitted and all(ctx.lookup(n) is not None for n in names):
            ctx.emitted = True
            response = InferResponse(outputs=select_outputs(
                {n: ctx.lookup(n) for n in names}, self._request.requested_outputs))
            if not self._owner.decoupled:
                self._last = response
            elif ctx.parent is None:
                self._sink.send(response, False)
            else:  # siblings stream in the order their decoupled step produced them
                parent = ctx.parent
                parent.buffer[ctx.index] = response
                while parent.cursor in parent.buffer:
                    self._sink.send(parent.buffer.pop(parent.cursor), False)
                    parent.cursor += 1
        for child in ctx.children:
            self._collect_outputs(child)

    def _leftovers(self, ctx: _Context) -> list[InferResponse]:
        """Buffered responses still waiting on a sibling that never answered, in order."""
        out = [ctx.buffer[i] for i in sorted(ctx.buffer)]
        ctx.buffer.clear()
        for child in ctx.children:
            out.extend(self._leftovers(child))
        return out

    def _fail(self, error: ServingError, model: str) -> None:
        with self._lock:
            if self._failed:
                return
            self._failed = True
        message = f"in ensemble '{self._owner.config.name}' step '{model}': {error.message}"
        self._request.cancelled.set()
        self._sink.send(InferResponse(error=ServingError(error.status, message)), True)
        self._done()

    def _finish(self) -> None:
        with self._lock:
            if self._finished or self._failed:
                return
            self._finished = True
            leftovers = self._leftovers(self._root)
        if self._owner.decoupled:
            for response in leftovers:
                self._sink.send(response, False)
            self._sink.send(None, True)
        elif self._last is not None:
            self._sink.send(self._last, True)
        else:
            self._sink.send(InferResponse(error=ServingError(
                "INTERNAL", f"ensemble '{self._owner.config.name}' produced no outputs")), True)
        self._done()


class EnsembleBackend(Backend):
    """Platform "ensemble": runs `ensemble_scheduling` over models found through `resolve`."""

    def __init__(self, config: mc.ModelConfig, model_dir: Path, version: int,
                 resolve: Resolver | None = None) -> None:
        super().__init__(config, model_dir, version)
        self._resolve = resolve
        self._step_decoupled: list[bool] = []
        self.decoupled = config.model_transaction_policy.decoupled
        self._active = 0
        self._idle = threading.Condition()

    def resolve(self, name: str, version: int) -> Backend:
        if self._resolve is None:
            raise ServingError("UNAVAILABLE", f"ensemble '{self.config.name}' has no resolver")
        return self._resolve(name, version if version > 0 else -1)

    def step_decoupled(self, index: int) -> bool:
        return self._step_decoupled[index]

    def load(self) -> None:
        steps = self.config.ensemble_scheduling.step
        if not steps:
            raise ServingError("INVALID_ARGUMENT",
                               f"ensemble '{self.config.name}': ensemble_scheduling has no step")
        check_graph(self.config)
        self._step_decoupled = [self._check_step(step) for step in steps]
        if any(self._step_decoupled):
            self.decoupled = True
            self.config.model_transaction_policy.decoupled = True

    def _check_step(self, step: mc.ModelEnsembling.Step) -> bool:
        """Check a step's maps against its model's config; return whether it is decoupled."""
        where = f"ensemble '{self.config.name}' step '{step.model_name}'"
        try:
            backend = self.resolve(step.model_name, step.model_version)
        except ServingError as err:
            raise ServingError("UNAVAILABLE", f"{where}: {err.message}") from err
        inputs = {i.name for i in backend.config.input}
        outputs = {o.name for o in backend.config.output}
        for name in step.input_map:
            if name not in inputs:
                raise ServingError("INVALID_ARGUMENT", f"{where}: input_map key '{name}' is "
                                   f"not an input of the model ({sorted(inputs)})")
        for name in step.output_map:
            if name not in outputs:
                raise ServingError("INVALID_ARGUMENT", f"{where}: output_map key '{name}' is "
                                   f"not an output of the model ({sorted(outputs)})")
        return backend.config.model_transaction_policy.decoupled

    def submit(self, request: InferRequest, sink: ResponseSink) -> None:
        try:
            validate_request(self.config, request)
        except ServingError as err:
            sink.send(InferResponse(error=err), True)
            return
        with self._idle:
            self._active += 1
        _EnsembleRun(self, request, sink, self._run_done).start()

    def _run_done(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def unload(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._active == 0, timeout=60)


def check_graph(config: mc.ModelConfig) -> None:
    """Every step input comes from an ensemble input or one step's output; every ensemble
    output is produced; no tensor is produced twice; no cycles."""
    name = config.name
    produced: dict[str, int] = {i.name: -1 for i in config.input}
    for index, step in enumerate(config.ensemble_scheduling.step):
        for tensor in step.output_map.values():
            if tensor in produced:
                raise ServingError("INVALID_ARGUMENT", f"ensemble '{name}': tensor '{tensor}' "
                                   "is produced more than once")
            produced[tensor] = index
    for step in config.ensemble_scheduling.step:
        for tensor in step.input_map.values():
            if tensor not in produced:
                raise ServingError("INVALID_ARGUMENT", f"ensemble '{name}' step "
                                   f"'{step.model_name}': input tensor '{tensor}' is never "
                                   "produced")
    for output in config.output:
        if output.name not in produced:
            raise ServingError("INVALID_ARGUMENT", f"ensemble '{name}': output "
                               f"'{output.name}' is not produced by any step")
    available = {t for t, i in produced.items() if i == -1}
    pending = list(config.ensemble_scheduling.step)
    while pending:
        runnable = [s for s in pending if set(s.input_map.values()) <= available]
        if not runnable:
            raise ServingError("INVALID_ARGUMENT", f"ensemble '{name}': steps "
                               f"{[s.model_name for s in pending]} form a cycle")
        for step in runnable:
            available |= set(step.output_map.values())
            pending.remove(step)


class _RoutedStep(Backend):
    """A step model seen through the model manager: submits count in that model's statistics."""

    def __init__(self, loaded: object, backend: Backend,
                 submit: Callable[[object, InferRequest, ResponseSink], None]) -> None:
        super().__init__(backend.config, backend.model_dir, backend.version)
        self._loaded = loaded
        self._submit = submit

    def load(self) -> None:
        """Already loaded by the manager."""

    def submit(self, request: InferRequest, sink: ResponseSink) -> None:
        self._submit(self._loaded, request, sink)


class ManagerResolver:
    """Resolves ensemble steps to the manager's currently served version at each request, so
    reloading a step model takes effect in the ensemble without reloading the ensemble."""

    def __init__(self, get: Callable[[str, str], tuple[object, object]],
                 submit: Callable[[object, InferRequest, ResponseSink], None]) -> None:
        self._get = get
        self._submit = submit

    def __call__(self, name: str, version: int) -> Backend:
        _, loaded = self._get(name, str(version) if version > 0 else "")
        backend: Backend = loaded.backend  # type: ignore[attr-defined]
        return _RoutedStep(loaded, backend, self._submit)
