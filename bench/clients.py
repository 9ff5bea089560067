"""Order clients for the HA benchmarks: a few clients ordering through every shop instance,
each order with its own key, and what they saw (when each acknowledged order was sent and
acknowledged), to measure a write outage from outside: fault -> the first acknowledged order
sent after it. Bounded in time: every client stops at its deadline."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Sequence

import requests


class OrderClients:
    def __init__(self, shops: Sequence[str], clients: int, *, max_s: float, tag: str) -> None:
        self.shops = list(shops)
        self.count = clients
        self.max_s = max_s
        self.tag = tag
        self.acks: list[tuple[float, float, str]] = []  # (sent, acknowledged, order id)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)
        ]

    def start(self) -> OrderClients:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=20)

    def _client(self, n: int) -> None:
        deadline = time.monotonic() + self.max_s
        with requests.Session() as session:
            while not self._stop.is_set() and time.monotonic() < deadline:
                sent = time.monotonic()
                try:
                    r = session.post(
                        f"{self.shops[n % len(self.shops)]}/orders",
                        json={
                            "product_id": 1 + (n * 7 + len(self.acks)) % 50,
                            "quantity": 1,
                            "customer": f"{self.tag}-{n}",
                            "address": "1 Road",
                        },
                        headers={"Idempotency-Key": str(uuid.uuid4())},
                        timeout=15,
                    )
                except requests.RequestException:
                    time.sleep(0.05)
                    continue
                if r.status_code == 201:
                    with self._lock:
                        self.acks.append((sent, time.monotonic(), r.json()["id"]))
                else:
                    time.sleep(0.05)

    def acknowledged(self) -> list[tuple[float, float, str]]:
        with self._lock:
            return sorted(self.acks, key=lambda a: a[1])

    def ids(self) -> list[str]:
        return [a[2] for a in self.acknowledged()]

    def outage_after(self, at: float) -> float:
        """From `at` to the acknowledgement of the first order sent after it (inf: none)."""
        after = [a for a in self.acknowledged() if a[0] > at]
        return (after[0][1] - at) if after else float("inf")

    def longest_gap_after(self, at: float) -> float:
        """The longest time from `at` on without any acknowledgement."""
        times = [at] + [a[1] for a in self.acknowledged() if a[1] > at]
        return max((b - a for a, b in itertools.pairwise(times)), default=float("inf"))
