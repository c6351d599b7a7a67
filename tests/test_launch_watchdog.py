"""The watchdog protocol over a real TCPStore: a silent worker is noticed by rank 0, which
aborts the job for everyone; a vanished store (rank 0 gone) is noticed by the workers."""

from __future__ import annotations

import datetime
import time

import torch.distributed as dist

from launcher.discovery import free_port
from launcher.watchdog import Watchdog, connect_store


def _wait(pred, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


def _server(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=10))


def test_silent_worker_aborts_everyone() -> None:
    port = free_port()
    server = _server(port)
    lost: dict[int, str] = {}
    dogs = [Watchdog(connect_store("127.0.0.1", port), r, 3, interval_s=0.2, timeout_s=1.0,
                     on_lost=lambda why, r=r: lost.__setitem__(r, why), exit_process=False)
            for r in range(3)]
    for d in dogs:
        d.start()
    time.sleep(0.8)
    assert not lost  # everyone beating: nobody is declared lost
    dogs[2].stop()  # rank 2 goes silent
    took = _wait(lambda: 0 in lost and 1 in lost, 5)
    assert "rank 2 sent no heartbeat" in lost[0]
    assert "aborted" in lost[1] and "rank 2" in lost[1]
    assert took < 3
    del server


def test_store_loss_means_rank0_gone() -> None:
    port = free_port()
    server = _server(port)
    lost: list[str] = []
    dog = Watchdog(connect_store("127.0.0.1", port), 1, 2, interval_s=0.2, timeout_s=30,
                   on_lost=lost.append, exit_process=False).start()
    time.sleep(0.5)
    del server  # the store lives in rank 0: its death closes it
    _wait(lambda: bool(lost), 5)
    assert "store unreachable" in lost[0]
    dog.stop()
