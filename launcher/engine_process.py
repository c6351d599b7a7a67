"""One giant model's engine in a process of its own (vLLM V1's EngineCore split).

The engine process is rank 0 of the model's world: it spawns ranks 1..N-1 with `start_local_engine`,
runs the step loop (heartbeats included) and talks to the front over a multiprocessing Pipe:
commands (add / abort / stats / shutdown) down, one batch of Token tuples
(runtime.engine_client.Token, logprobs included when asked for) per step up. Each loaded version of
each giant model gets its own process and its own torch.distributed world, so one server drives
several giant models and reloads them without downtime. Deaths are contained: a dead rank makes that
model fail (its engine process kills the survivors and exits), the front's death makes every engine
process and rank exit.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import psutil

from runtime.engine_client import (
    CLOSED,
    DEAD,
    EOF,
    ERROR,
    READY,
    EngineClient,
    EngineInfo,
    StepBatch,
    describe_exit,
    unpack,
)
from runtime.worker import EngineSpec

log = logging.getLogger(__name__)
UNREPORTED_DEATH_S = 5.0  # a rank gone this long without the engine saying so: kill the engine
CHECK_EVERY_S = 1.0


# --- the engine process -----------------------------------------------------------------------
def engine_process_main(spec: EngineSpec, conn: Connection, parent_pid: int, name: str,
                        log_level: int) -> None:
    """Entry point of the engine process: start the ranks, then serve commands until shutdown,
    the front's death or a rank's death (then exit non-zero, survivors killed)."""
    from launcher.local import start_local_engine, start_parent_watch
    from runtime.engine_client import EngineLoop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the front shuts us down
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mp.current_process().daemon = False  # started as a daemon, but it must spawn its ranks
    start_parent_watch(parent_pid)
    try:
        local = start_local_engine(spec)
    except BaseException as e:
        _send(conn, (ERROR, f"{type(e).__name__}: {e}"))
        os._exit(1)
    info = EngineInfo.of(local.engine, [os.getpid()] + [p.pid for p in local.workers])
    _send(conn, (READY, info))
    commands: queue.Queue = queue.Queue()
    threading.Thread(target=_read_commands, args=(conn, commands), name="commands",
                     daemon=True).start()
    failure = EngineLoop(local.engine, commands, conn.send, name, local.dead_workers).run()
    if failure is not None:
        log.error("model %s: %s; stopping its ranks", name, failure)
        _send(conn, (DEAD, failure))
        local.kill()
        os._exit(1)
    local.close()
    _send(conn, (CLOSED, None))


def _send(conn: Connection, event: tuple) -> None:
    try:
        conn.send(event)
    except OSError:  # the front is gone
        pass


def _read_commands(conn: Connection, commands: queue.Queue) -> None:
    """Move commands from the pipe to the engine loop; EOF (the front is gone) stops it."""
    try:
        while True:
            commands.put(conn.recv())
    except (EOFError, OSError):
        commands.put((EOF,))


# --- the front's side -------------------------------------------------------------------------
class EngineProcessClient(EngineClient):
    """The front's handle on an engine process. `start` returns once every rank has loaded."""

    fatal = False  # a dead engine process breaks only its own model

    def __init__(self, spec: EngineSpec, name: str) -> None:
        self.spec, self.name = spec, name
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        level = logging.getLogger().getEffectiveLevel()
        self.proc = ctx.Process(target=engine_process_main,
                                args=(spec, child, os.getpid(), name, level),
                                name=f"shardserve-engine-{name}", daemon=True)
        self._lock = threading.Lock()
        self._closing = False
        self._ranks: list[psutil.Process | None] = []
        self._gone_since: dict[int, float] = {}
        self._next_check = 0.0
        self.proc.start()
        child.close()
        self.tokenizer: Any = None

    @classmethod
    def start(cls, spec: EngineSpec, name: str) -> EngineProcessClient:
        """Start the engine process and wait until it is ready; RuntimeError says why not."""
        from runtime.tokenizer import Tokenizer

        client = cls(spec, name)
        try:
            client.tokenizer = Tokenizer.from_dir(spec.model)  # while the ranks load
            client.info = client._wait_ready()
        except BaseException:
            client.close(5.0)
            raise
        client._ranks = [_process(pid) for pid in client.info.pids[1:]]
        return client

    def _wait_ready(self) -> EngineInfo:
        while True:
            if self._conn.poll(0.5):
                try:
                    event = self._conn.recv()
                except (EOFError, OSError):
                    raise RuntimeError(self._exit_reason()) from None
                if event[0] == READY:
                    return event[1]
                raise RuntimeError(event[1])
            if not self.proc.is_alive():
                raise RuntimeError(self._exit_reason())

    def _send(self, cmd: tuple) -> None:
        try:
            with self._lock:
                self._conn.send(cmd)
        except OSError:  # the engine is gone; `recv` reports why to every request
            pass

    def shutdown(self) -> None:
        self._closing = True
        super().shutdown()

    def recv(self, timeout_s: float) -> list[StepBatch]:
        events: list[tuple] = []
        try:
            if self._conn.poll(timeout_s):
                events.append(self._conn.recv())
                while self._conn.poll(0):
                    events.append(self._conn.recv())
        except (EOFError, OSError):
            events.append((CLOSED, None) if self._closing else (DEAD, self._exit_reason()))
        if not events:
            lost = self._check_ranks()
            if lost:
                events.append((DEAD, lost))
        return unpack(events)

    def _exit_reason(self) -> str:
        self.proc.join(2.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5.0)
            return f"the engine process (rank 0, pid {self.proc.pid}) stopped answering"
        return describe_exit(0, self.proc.exitcode, f" (engine process, pid {self.proc.pid})")

    def _check_ranks(self) -> str | None:
        """Safety net for an engine that hangs instead of reporting a dead rank."""
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + CHECK_EVERY_S
        if not self.proc.is_alive():
            return self._exit_reason()
        for rank, p in enumerate(self._ranks, start=1):
            if _alive(p):
                continue
            since = self._gone_since.setdefault(rank, now)
            if now - since >= UNREPORTED_DEATH_S:
                self.proc.kill()  # its ranks follow (they watch their parent)
                pid = p.pid if p is not None else "?"
                return (f"rank {rank} (pid {pid}) exited and the engine process did not "
                        f"report it within {UNREPORTED_DEATH_S:.0f} s")
        return None

    def close(self, timeout_s: float = 30.0) -> None:
        """Wait for the engine process and its ranks to exit; kill what is left after that."""
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            log.warning("model %s: engine process %d did not exit in %.0f s; killing it",
                        self.name, self.proc.pid, timeout_s)
            self.proc.kill()
            self.proc.join(5.0)
        left = [p for p in self._ranks if p is not None and _alive(p)]
        _, alive = psutil.wait_procs(left, timeout=5.0)
        for p in alive:  # they exit on their own when rank 0 is gone; this is a last resort
            log.warning("model %s: rank pid %d still running; killing it", self.name, p.pid)
            p.kill()
        self._conn.close()


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:  # already gone
        return None


def _alive(p: psutil.Process | None) -> bool:
    """Running and not a zombie (is_running also guards against a reused pid)."""
    if p is None:
        return False
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
