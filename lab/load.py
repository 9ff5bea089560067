"""Order load on loopback: N client threads for a fixed time, every request with its own key."""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import requests

MAX_DURATION_S = 3600.0


@dataclass(slots=True)
class LoadResult:
    duration_s: float
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)

    @property
    def created(self) -> int:
        return self.statuses["201"]

    @property
    def orders_per_s(self) -> float:
        return self.created / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, q: float) -> float:
        if len(self.latencies_s) < 2:
            return self.latencies_s[0] * 1000 if self.latencies_s else float("nan")
        cuts = statistics.quantiles(self.latencies_s, n=1000, method="inclusive")
        return cuts[min(int(q * 1000) - 1, len(cuts) - 1)] * 1000


def run_order_load(
    shop_urls: Sequence[str],
    *,
    clients: int,
    duration_s: float,
    product_ids: Sequence[int],
    quantity: int = 1,
    timeout_s: float = 10.0,
    think_s: float = 0.0,
    seed: int | None = None,
    stop: threading.Event | None = None,
) -> LoadResult:
    """Bounded: stops after `duration_s` (at most an hour), whatever the shop does."""
    if not 0 < duration_s <= MAX_DURATION_S:
        raise ValueError(f"duration_s must be in (0, {MAX_DURATION_S}]")
    if any(not url.startswith(("http://127.", "http://localhost")) for url in shop_urls):
        raise ValueError("load goes to loopback addresses only")
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + duration_s
    result = LoadResult(duration_s=duration_s)

    def client(n: int) -> None:
        rng = random.Random(None if seed is None else seed + n)
        url = f"{shop_urls[n % len(shop_urls)]}/orders"
        statuses: Counter[str] = Counter()
        latencies: list[float] = []
        acked: list[str] = []
        with requests.Session() as session:
            while (now := time.monotonic()) < deadline and not (stop and stop.is_set()):
                body = {
                    "product_id": rng.choice(product_ids),
                    "quantity": quantity,
                    "customer": f"load-{n}",
                    "address": "1 Loopback Road",
                }
                try:
                    response = session.post(
                        url,
                        json=body,
                        headers={"Idempotency-Key": str(uuid.uuid4())},
                        timeout=min(timeout_s, max(0.1, deadline - now + 1)),
                    )
                except requests.RequestException as exc:
                    statuses[type(exc).__name__] += 1
                    time.sleep(0.01)  # a refused connection must not spin the loop
                    continue
                latencies.append(time.monotonic() - now)
                statuses[str(response.status_code)] += 1
                if response.status_code == 201:
                    acked.append(response.json()["id"])
                if think_s:
                    time.sleep(think_s)
        with lock:
            result.statuses.update(statuses)
            result.latencies_s.extend(latencies)
            result.acknowledged.extend(acked)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration_s + timeout_s + 5)
    result.duration_s = time.monotonic() - started
    return result
