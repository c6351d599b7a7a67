"""The request queue in front of a model's instances: Triton's dynamic batcher and its default
(one request at a time) scheduler, with priority levels, queue limits and queue timeouts.

Instances pull work with `next_batch()`; the batcher decides when a batch is ready following
Triton's rules: a preferred batch size goes out at once, otherwise the batch waits up to
`max_queue_delay_microseconds` for more requests, never exceeding `max_batch_size`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2 as mc

from serving.types import InferRequest, InferResponse, ResponseSink, ServingError

REJECT = mc.ModelQueuePolicy.REJECT
DELAY = mc.ModelQueuePolicy.DELAY


@dataclass(eq=False)
class Pending:
    """A queued request with its bookkeeping."""

    request: InferRequest
    sink: ResponseSink
    batch_size: int = 1
    key: Hashable = None
    enqueue_ns: int = 0
    deadline_ns: int = 0
    level: int = 0
    dispatch_ns: int = 0
    delayed: bool = False


def _fail(pending: Pending, status: str, message: str) -> None:
    pending.sink.send(InferResponse(error=ServingError(status, message)), True)


class DynamicBatcher:
    """A thread-safe queue that hands batches of requests to instance threads.

    With `batching=False` it is Triton's default scheduler: one request per execution, FIFO, no
    queue policy. `batch_key` keeps requests with incompatible shapes out of one batch.
    """

    def __init__(self, config: mc.ModelConfig, batching: bool,
                 batch_key: Callable[[InferRequest], Hashable] | None = None,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        dyn = config.dynamic_batching
        self._name = config.name
        self._batching = batching and config.max_batch_size > 0
        self._max_size = max(config.max_batch_size, 1)
        self._preferred = sorted(s for s in dyn.preferred_batch_size if s <= self._max_size)
        self._max_preferred = self._preferred[-1] if self._preferred else self._max_size
        self._delay_ns = dyn.max_queue_delay_microseconds * 1000
        self._levels = max(dyn.priority_levels, 1)
        default = dyn.default_priority_level
        self._default_level = default if 1 <= default <= self._levels else 1
        self._policies = {lvl: dyn.priority_queue_policy.get(lvl, dyn.default_queue_policy)
                          for lvl in range(1, self._levels + 1)}
        self._batch_key = batch_key
        self._clock = clock
        self._queues: dict[int, deque[Pending]] = {lvl: deque() for lvl in self._policies}
        self._delayed: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._reaper: threading.Thread | None = None
        if any(p.default_timeout_microseconds or p.allow_timeout_override
               for p in self._policies.values()):
            # Instances may all be busy; a queued request must still time out on time.
            self._reaper = threading.Thread(target=self._reap, daemon=True,
                                            name=f"{self._name}-queue-timeouts")
            self._reaper.start()

    # --- producer side ---------------------------------------------------------------------

    def level_of(self, request: InferRequest) -> int:
        """The priority level a request queues at (0 or out of range: the default level)."""
        return request.priority if 1 <= request.priority <= self._levels else self._default_level

    def enqueue(self, pending: Pending) -> None:
        """Queue a request; raise ServingError("RESOURCE_EXHAUSTED") when its level's queue is
        full."""
        request = pending.request
        pending.level = level = self.level_of(request)
        policy = self._policies[level]
        pending.enqueue_ns = now = self._clock()
        timeout_us = policy.default_timeout_microseconds
        if policy.allow_timeout_override and request.timeout_us > 0:
            timeout_us = request.timeout_us
        pending.deadline_ns = now + timeout_us * 1000 if timeout_us > 0 else 0
        pending.key = self._batch_key(request) if self._batch_key else None
        with self._cond:
            if self._closed:
                raise ServingError("UNAVAILABLE", f"model '{self._name}' is unloading")
            queue = self._queues[level]
            if policy.max_queue_size > 0 and len(queue) >= policy.max_queue_size:
                raise ServingError("RESOURCE_EXHAUSTED",
                                   f"Exceeds maximum queue size: model '{self._name}' priority "
                                   f"level {level} already holds {policy.max_queue_size} "
                                   "requests (max_queue_size)")
            queue.append(pending)
            self._cond.notify_all()

    def pending_count(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values()) + len(self._delayed)

    def close(self) -> None:
        """Stop accepting requests; `next_batch` drains what is queued, then returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # --- consumer side ---------------------------------------------------------------------

    def next_batch(self) -> list[Pending] | None:
        """Block until a batch is ready and return it (None once closed and drained)."""
        with self._cond:
            while True:
                now = self._clock()
                wake = self._expire(now)
                ordered = list(self._in_order())
                if not ordered:
                    if self._closed:
                        return None
                    self._wait(wake, now)
                    continue
                batch, ready_at = self._form(ordered, now)
                if batch:
                    self._remove(batch, now)
                    return batch
                times = [t for t in (wake, ready_at) if t]
                self._wait(min(times) if times else 0, now)

    def _reap(self) -> None:
        with self._cond:
            while not self._closed:
                now = self._clock()
                self._wait(self._expire(now), now)

    def _wait(self, until_ns: int, now: int) -> None:
        self._cond.wait(None if not until_ns else max(until_ns - now, 0) / 1e9)

    def _in_order(self) -> Iterator[Pending]:
        for lvl in sorted(self._queues):
            yield from self._queues[lvl]
        yield from self._delayed

    def _expire(self, now: int) -> int:
        """Reject or delay timed-out requests, drop cancelled ones; return the next deadline."""
        next_deadline = 0
        for queue in self._queues.values():
            for pending in list(queue):
                if pending.request.cancelled.is_set():
                    queue.remove(pending)
                    _fail(pending, "CANCELLED", "request was cancelled while queued")
                elif pending.deadline_ns and pending.deadline_ns <= now:
                    queue.remove(pending)
                    if self._policies[pending.level].timeout_action == DELAY:
                        pending.delayed = True
                        self._delayed.append(pending)
                    else:
                        _fail(pending, "UNAVAILABLE",
                              f"Request timeout expired in the queue of model '{self._name}'")
                elif pending.deadline_ns:
                    next_deadline = min(next_deadline or pending.deadline_ns, pending.deadline_ns)
        return next_deadline

    def _form(self, ordered: list[Pending], now: int) -> tuple[list[Pending], int]:
        """Pick the batch to run now, or return ([], time at which to look again)."""
        if not self._batching:
            return ordered[:1], 0
        picked: list[Pending] = []
        total = best = 0
        send_now = False
        for pending in ordered:
            if picked and (pending.key != picked[0].key
                           or total + pending.batch_size > self._max_size):
                send_now = True
                break
            picked.append(pending)
            total += pending.batch_size
            if total in self._preferred:
                best = len(picked)
        oldest = min(p.enqueue_ns for p in picked)
        delay_exceeded = now - oldest >= self._delay_ns
        if best and not delay_exceeded:
            return picked[:best], 0
        if send_now or total >= self._max_preferred or delay_exceeded or self._delay_ns == 0:
            return picked, 0
        return [], oldest + self._delay_ns

    def _remove(self, batch: list[Pending], now: int) -> None:
        for pending in batch:
            queue = self._delayed if pending.delayed else self._queues[pending.level]
            queue.remove(pending)
            pending.dispatch_ns = now
