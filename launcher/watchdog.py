"""Peer-loss watchdog: no rank outlives a dead peer by more than a few seconds.

Every rank runs a daemon thread that bumps its heartbeat counter in the rendezvous store
(``hb/<rank>``) each ``interval_s``. Rank 0 watches every worker's counter; a worker watches
rank 0's counter and a shared ``abort`` flag. Liveness is judged by whether a counter moved
within ``timeout_s`` on the watcher's own clock, so host clocks need not agree. Loss of the
store itself (it lives in rank 0 or in torchrun's agent) counts as rank 0 being gone.
On loss the watchdog publishes the reason, calls ``on_lost`` (e.g. mark the front not-ready)
and ends the process with ``os._exit(EXIT_PEER_LOST)``: a blocked collective cannot be
interrupted otherwise, and interpreter shutdown could hang in the process group's teardown.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

EXIT_PEER_LOST = 75
_PREFIX = "shardserve/watchdog/"


def connect_store(addr: str, port: int, timeout_s: float = 10.0) -> dist.Store:
    """A private client connection to the rendezvous store (separate from the process group's)."""
    store = dist.TCPStore(
        addr,
        port,
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    return dist.PrefixStore(_PREFIX, store)


class Watchdog:
    """Heartbeat thread for one rank; see the module docstring for the protocol."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        *,
        interval_s: float = 1.0,
        timeout_s: float = 10.0,
        on_lost: Callable[[str], None] | None = None,
        exit_process: bool = True,
    ) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.on_lost, self.exit_process = on_lost, exit_process
        self.lost_reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watchdog-{rank}", daemon=True)
        peers = range(1, world_size) if rank == 0 else [0]
        now = time.monotonic()
        self._seen: dict[int, tuple[int, float]] = {p: (-1, now) for p in peers}

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating (orderly shutdown: peers will not be told anything)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def abort(self, reason: str) -> None:
        """Tell every rank to exit (e.g. on a startup error on this rank)."""
        try:
            self.store.set("abort_reason", f"rank {self.rank}: {reason}")
            self.store.add("abort", 1)
        except Exception:  # noqa: BLE001 - the store may already be gone; peers notice that too
            pass

    def _check_peers(self) -> str | None:
        now = time.monotonic()
        for peer, (count, since) in self._seen.items():
            value = self.store.add(f"hb/{peer}", 0)
            if value != count:
                self._seen[peer] = (value, now)
            elif now - since > self.timeout_s:
                return f"rank {peer} sent no heartbeat for {now - since:.1f} s"
        if self.rank != 0 and self.store.add("abort", 0) > 0:
            return f"job aborted ({self.store.get('abort_reason').decode()})"
        return None

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self.interval_s if failures == 0 else self.interval_s / 2):
            try:
                self.store.add(f"hb/{self.rank}", 1)
                reason = self._check_peers()
                failures = 0
            except Exception as e:  # noqa: BLE001 - any store failure means the store is gone
                failures += 1
                if failures < 2:
                    continue
                reason = f"rendezvous store unreachable, rank 0 presumed dead ({e})"
            if reason is not None and not self._stop.is_set():
                self._lost(reason)
                return

    def _lost(self, reason: str) -> None:
        self.lost_reason = reason
        sys.stderr.write(f"shardserve watchdog: rank {self.rank}: peer lost: {reason}\n")
        sys.stderr.flush()
        if self.rank == 0:
            self.abort(reason)
        if self.on_lost is not None:
            try:
                self.on_lost(reason)
            except Exception as e:  # noqa: BLE001 - exiting matters more than the hook
                print(f"shardserve watchdog: on_lost hook failed: {e}", file=sys.stderr)
        if self.exit_process:
            sys.stdout.flush()
            os._exit(EXIT_PEER_LOST)
