"""The front's handle on an engine, wherever it runs (vLLM V1's EngineCore split).

An `EngineLoop` owns an `LLMEngine` and runs its step loop (heartbeats included): it takes
commands (add / abort / stats / shutdown) from a queue and emits one batch per step with every
request's new token, the requests it refused and the engine's stats. An `EngineClient` is what
the serving front holds: `InProcessClient` runs the loop in a thread of this process (a world
that torchrun/mpirun/Slurm started, or a local engine); `launcher.engine_process` runs it in an
engine process of its own, so one server can drive several giant models and reload them.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtime.types import SamplingParams, TokenOutput

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5  # idle: wait this long for a command, then step (the heartbeat)
STATS_EVERY_S = 0.5  # emit a stats-only batch at least this often
DEATH_GRACE_S = 2.0  # after a step failed: how long to wait for a dead rank to show

# commands (front -> engine), plain tuples so that they pickle small
ADD, ABORT, STATS, SHUTDOWN, EOF = "add", "abort", "stats", "shutdown", "eof"
# events (engine -> front)
OUT, READY, ERROR, DEAD, CLOSED = "out", "ready", "error", "dead", "closed"

# (request id, token id or None, finished, finish reason, logprobs); logprobs is None unless the
# request asked for them, else (the token's logprob, [(token id, logprob), ...] best first)
TokenLogprobs = tuple[float, list[tuple[int, float]]]
Token = tuple[str, int | None, bool, str | None, TokenLogprobs | None]


@dataclass
class StepBatch:
    """What one engine step produced: tokens, refused requests and the stats after it."""

    tokens: list[Token] = field(default_factory=list)
    rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (id, status, message)
    stats: dict[str, Any] = field(default_factory=dict)


class EngineStopped(Exception):
    """The engine is gone: `failed` says whether it died (message names the rank) or was shut
    down on request."""

    def __init__(self, message: str, failed: bool,
                 batches: list[StepBatch] | None = None) -> None:
        super().__init__(message)
        self.message, self.failed = message, failed
        self.batches = batches or []  # batches that arrived before the end: handle them first


@dataclass
class EngineInfo:
    """What the front needs to know of a running engine."""

    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    num_blocks: int
    dtype: str
    pids: list[int]  # rank 0 (the engine's process) first, then ranks 1..N-1
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, engine: Any, pids: list[int]) -> EngineInfo:
        return cls(engine.vocab_size, engine.max_model_len, list(engine.eos_token_ids),
                   engine.num_blocks, engine.dtype, pids, engine.stats())


def describe_exit(rank: int, code: int | None, what: str = "") -> str:
    """'rank 2 exited with code -9 (SIGKILL)' (what: e.g. ' (engine process, pid 12)')."""
    text = f"rank {rank}{what} exited with code {code}"
    if code is not None and code < 0:
        try:
            text += f" ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return text


def describe_dead(dead: list[tuple[int, int | None]]) -> str:
    """One line for the worker ranks that exited: killed ones first (they are the cause)."""
    ordered = sorted(dead, key=lambda d: (d[1] is None or d[1] >= 0, d[0]))
    return "; ".join(describe_exit(rank, code) for rank, code in ordered)


def token_of(out: TokenOutput) -> Token:
    """A TokenOutput as the plain tuple that travels to the front."""
    lps = None if out.logprob is None else (out.logprob, out.top_logprobs or [])
    return out.request_id, out.token_id, out.finished, out.finish_reason, lps


class EngineLoop:
    """Drives one LLMEngine from a command queue; `emit` gets one event tuple per step.

    Runs on the one thread that owns the engine (the engine process's main thread, or the
    in-process client's thread). `run` returns None after a shutdown command, else the reason
    the engine failed (a dead rank named with its exit code).
    """

    def __init__(self, engine: Any, commands: queue.Queue, emit: Callable[[tuple], None],
                 name: str, dead_ranks: Callable[[], list[tuple[int, int | None]]] = list
                 ) -> None:
        self.engine, self.commands, self.emit, self.name = engine, commands, emit, name
        self.dead_ranks = dead_ranks
        self._rejects: list[tuple[str, str, str]] = []
        self._last_emit = 0.0
        from runtime.engine import EngineFull

        self._full = EngineFull

    def run(self) -> str | None:
        try:
            while True:
                if not self._take(block=not self.engine.has_unfinished()):
                    return None
                tokens = [token_of(o) for o in self.engine.step()]
                dead = self.dead_ranks()
                if dead:
                    return describe_dead(dead)
                now = time.monotonic()
                if tokens or self._rejects or now - self._last_emit >= STATS_EVERY_S:
                    self._emit(tokens, now)
        except Exception as e:  # a collective that failed because a peer died, most likely
            return self._explain(e)

    def _emit(self, tokens: list[Token], now: float) -> None:
        self.emit((OUT, tokens, self._rejects, self.engine.stats()))
        self._rejects, self._last_emit = [], now

    def _explain(self, error: Exception) -> str:
        """Name the dead rank behind a failed step when there is one (its exit shows soon)."""
        deadline = time.monotonic() + DEATH_GRACE_S
        while time.monotonic() < deadline:
            dead = self.dead_ranks()
            if dead:
                return describe_dead(dead)
            time.sleep(0.05)
        log.error("model %s: engine step failed", self.name, exc_info=error)
        return f"engine step failed: {type(error).__name__}: {str(error)[:300]}"

    def _take(self, block: bool) -> bool:
        """Apply every queued command (waiting up to IDLE_WAIT_S when idle); False to stop."""
        try:
            first = self.commands.get(timeout=IDLE_WAIT_S) if block else (
                self.commands.get_nowait())
        except queue.Empty:
            return True
        batch = [first]
        while True:
            try:
                batch.append(self.commands.get_nowait())
            except queue.Empty:
                break
        for cmd in batch:
            if cmd[0] in (SHUTDOWN, EOF):
                return False
            self._apply(cmd)
        return True

    def _apply(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == ADD:
            _, rid, prompt, params = cmd
            try:
                self.engine.add_request(rid, prompt, params)
            except self._full as e:
                self._rejects.append((rid, "RESOURCE_EXHAUSTED",
                                      f"model '{self.name}' is overloaded: {e}"))
            except ValueError as e:
                self._rejects.append((rid, "INVALID_ARGUMENT", str(e)))
        elif kind == ABORT:
            self.engine.abort_request(cmd[1])
        elif kind == STATS:
            self._last_emit = 0.0  # the next step emits


class EngineClient(ABC):
    """The front's side of one engine: commands down, step batches up. Thread-safe sends;
    one thread (the backend's router) calls `recv`."""

    info: EngineInfo
    tokenizer: Any
    #: a failure also breaks this process (its torch.distributed world): the server must exit
    fatal: bool = False

    @abstractmethod
    def _send(self, cmd: tuple) -> None: ...

    def add(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._send((ADD, rid, prompt_ids, params))

    def abort(self, rid: str) -> None:
        self._send((ABORT, rid))

    def request_stats(self) -> None:
        self._send((STATS,))

    def shutdown(self) -> None:
        """Ask the engine to stop its ranks; `recv` then raises EngineStopped(failed=False)."""
        self._send((SHUTDOWN,))

    @abstractmethod
    def recv(self, timeout_s: float) -> list[StepBatch]:
        """Every batch that arrived within `timeout_s` (maybe none); EngineStopped at the end."""

    @abstractmethod
    def close(self, timeout_s: float = 30.0) -> None:
        """Wait for the engine (and its ranks) to be gone, forcing it after `timeout_s`."""


def batch_of(event: tuple) -> StepBatch:
    return StepBatch(event[1], event[2], event[3])


class InProcessClient(EngineClient):
    """The engine loop in a thread of this process: `local` is a LocalEngine or a LaunchedWorld
    (rank 0 of a torchrun/mpirun/Slurm world)."""

    fatal = True

    def __init__(self, local: Any, name: str) -> None:
        self.local, self.name = local, name
        engine = local.engine
        self.tokenizer = engine.tokenizer
        self.info = EngineInfo.of(engine, [os.getpid()] + [
            p.pid for p in getattr(local, "workers", [])])
        self._commands: queue.Queue = queue.Queue()
        self._events: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    def _send(self, cmd: tuple) -> None:
        self._commands.put(cmd)

    def report_lost(self, reason: str) -> None:
        """A peer rank was lost (the launcher's watchdog says so): fail every request now."""
        self._events.put((DEAD, f"a rank was lost: {reason}"))

    def _run(self) -> None:
        loop = EngineLoop(self.local.engine, self._commands, self._events.put, self.name,
                          getattr(self.local, "dead_workers", list))
        failure = loop.run()
        if failure is not None:
            log.error("model %s: %s", self.name, failure)
            self._events.put((DEAD, failure))
        try:
            self.local.close()
        except Exception as e:  # ranks already gone
            log.warning("model %s: rank shutdown: %s", self.name, str(e).splitlines()[0][:200])
        if failure is None:
            self._events.put((CLOSED, None))

    def recv(self, timeout_s: float) -> list[StepBatch]:
        try:
            events = [self._events.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        return unpack(events)

    def close(self, timeout_s: float = 30.0) -> None:
        self._thread.join(timeout_s)


def unpack(events: list[tuple]) -> list[StepBatch]:
    """Step batches from events; a dead/closed event raises EngineStopped after the batches
    before it have been handed on (callers see them first)."""
    out = []
    for ev in events:
        if ev[0] == OUT:
            out.append(batch_of(ev))
        elif ev[0] in (DEAD, CLOSED):
            raise EngineStopped(ev[1] or "the engine was shut down", ev[0] == DEAD, out)
    return out

