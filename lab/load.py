"""Order load on loopback: N client threads for a fixed time (`run_order_load`), and a careful
client's load that retries each order with its own key until acknowledged (`CarefulLoad`)."""

from __future__ import annotations

import itertools
import math
import random
import statistics
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests

from lab.observe import StackView

MAX_DURATION_S = 3600.0
# Failed attempts are kept by time for the game day's charts; a long soak against a dead shop
# keeps only the newest (about 4 MB of floats).
MAX_FAILURES_KEPT = 500_000


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


# -- a careful client's load, and the verification after it -------------------------------------
RETRIED_STATUSES = frozenset({500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Ack:
    """An acknowledged order: its key, id, and (monotonic) when it was first sent, when the
    attempt that succeeded was sent, and when the 201 came."""

    key: str
    order_id: str
    first_sent: float
    sent: float
    acked: float
    attempts: int


@dataclass(slots=True)
class CarefulLoad:
    """Concurrent orders as a careful client makes them: each with its own idempotency key,
    retried with that same key on 503, 5xx, timeouts and refused connections, with bounded
    exponential backoff; every acknowledged order recorded. `start()`, then `stop()`."""

    shop_urls: Sequence[str]
    product_ids: Sequence[int]
    clients: int = 4
    think_s: float = 0.02
    timeout_s: float = 10.0
    retry_budget_s: float = 30.0
    seed: int | None = None
    acks: list[Ack] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    # When each failed attempt's answer (or exception) came, monotonic: the errors per second.
    failures: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_FAILURES_KEPT))
    gave_up: list[str] = field(default_factory=list)
    started: float = 0.0
    stopped: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        if any(not url.startswith(("http://127.", "http://localhost")) for url in self.shop_urls):
            raise ValueError("load goes to loopback addresses only")

    def start(self) -> CarefulLoad:
        self.started = time.monotonic()
        self._threads = [
            threading.Thread(target=self._client, args=(n,), name=f"load-{n}", daemon=True)
            for n in range(self.clients)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + self.retry_budget_s + 5)
        self.stopped = time.monotonic()

    def _client(self, n: int) -> None:
        rng = random.Random(None if self.seed is None else self.seed + n)
        with requests.Session() as session:
            while not self._stop.is_set():
                body = {
                    "product_id": rng.choice(self.product_ids),
                    "quantity": 1,
                    "customer": f"careful-{n}",
                    "address": "1 Loopback Road",
                }
                url = self.shop_urls[(n + rng.randrange(len(self.shop_urls))) % len(self.shop_urls)]
                self._order(session, url, body, rng)
                if self.think_s:
                    time.sleep(self.think_s)

    def _order(
        self, session: requests.Session, url: str, body: dict[str, Any], rng: random.Random
    ) -> None:
        key = str(uuid.uuid4())
        first = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            sent = time.monotonic()
            try:
                response = session.post(
                    f"{url}/orders",
                    json=body,
                    headers={"Idempotency-Key": key},
                    timeout=self.timeout_s,
                )
                kind = str(response.status_code)
            except requests.Timeout:
                response, kind = None, "timeout"
            except requests.RequestException as exc:
                response, kind = None, type(exc).__name__
            if response is not None and response.status_code == 201:
                ack = Ack(key, response.json()["id"], first, sent, time.monotonic(), attempt)
                with self._lock:
                    self.acks.append(ack)
                return
            with self._lock:
                self.errors[kind] += 1
                self.failures.append(time.monotonic())
            retried = response is None or response.status_code in RETRIED_STATUSES
            if not retried:
                return  # 409 out of stock, 4xx: the client's answer, not the shop's failure
            if time.monotonic() - first > self.retry_budget_s:
                with self._lock:
                    self.gave_up.append(key)
                    self.errors["gave_up"] += 1
                return
            # Backoff with jitter; a stopping load still finishes the key it started.
            time.sleep(min(1.0, 0.05 * 2 ** min(attempt, 5)) * (0.5 + rng.random()))
            url = self.shop_urls[rng.randrange(len(self.shop_urls))]

    # -- reading it ------------------------------------------------------------------------
    def acknowledged(self) -> list[Ack]:
        with self._lock:
            return sorted(self.acks, key=lambda a: a.acked)

    def series(self, start: float, end: float) -> dict[str, list[int]]:
        """Acknowledged orders and failed attempts in each whole second of [start, end)
        (monotonic), the first bucket starting at `start`."""
        with self._lock:
            acked = [a.acked for a in self.acks]
            failed = list(self.failures)
        return {"orders": per_second(acked, start, end), "errors": per_second(failed, start, end)}

    def report(self) -> dict[str, Any]:
        acks = self.acknowledged()
        end = self.stopped or time.monotonic()
        duration = max(end - self.started, 1e-9)
        latencies = sorted(a.acked - a.first_sent for a in acks)
        times = [self.started, *(a.acked for a in acks), end]
        gap = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
        with self._lock:
            errors = dict(self.errors)
        return {
            "duration_s": round(duration, 3),
            "acknowledged": len(acks),
            "orders_per_s": round(len(acks) / duration, 2),
            "latency_p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
            "latency_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
            "errors": errors,
            "gave_up": len(self.gave_up),
            "retried_orders": sum(1 for a in acks if a.attempts > 1),
            "longest_gap_s": round(gap, 3),
        }


def per_second(times: Iterable[float], start: float, end: float) -> list[int]:
    """How many of `times` fall in each whole second from `start`; a last, partial second
    before `end` is left out (it would read as a drop)."""
    counts = [0] * max(0, int(end - start))
    for t in times:
        if start <= t:
            i = int(t - start)
            if i < len(counts):
                counts[i] += 1
    return counts


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank on sorted values (nan when empty): with few values, p99 is the maximum."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True, slots=True)
class Ledger:
    """Per product: stock and quantity moved out (inventory), quantity ordered (orders)."""

    stock: dict[int, int]
    moved: dict[int, int]
    ordered: dict[int, int]

    @classmethod
    def read(cls, view: StackView) -> Ledger:
        with view.leader_db("inventory") as conn:
            stock = dict(conn.execute("SELECT id, stock FROM products").fetchall())
            moved = dict(
                conn.execute(
                    "SELECT product_id, -sum(delta) FROM stock_movements GROUP BY product_id"
                ).fetchall()
            )
        with view.leader_db("orders") as conn:
            ordered = dict(
                conn.execute(
                    "SELECT product_id, sum(quantity) FROM orders GROUP BY product_id"
                ).fetchall()
            )
        return cls(
            {int(k): int(v) for k, v in stock.items()},
            {int(k): int(v) for k, v in moved.items()},
            {int(k): int(v) for k, v in ordered.items()},
        )

    def initial(self) -> dict[int, int]:
        return {p: s + self.moved.get(p, 0) for p, s in self.stock.items()}


def verify_orders(
    view: StackView, acks: Sequence[Ack], before: Ledger, *, deleted: Sequence[str] = ()
) -> dict[str, Any]:
    """After a load: every acknowledged order present exactly once (those a fault deleted on
    purpose apart), stock + sold = initial in the inventory, sold in the inventory = ordered
    in the orders database, no stock below zero, no transaction left prepared."""
    ids = [a.order_id for a in acks if a.order_id not in set(deleted)]
    present = view.orders_present(ids)
    keys = [a.key for a in acks]
    with view.leader_db("orders") as conn:
        twice = conn.execute(
            "SELECT count(*) FROM (SELECT idempotency_key FROM orders "
            "WHERE idempotency_key = ANY(%s) GROUP BY 1 HAVING count(*) > 1) t",
            (keys,),
        ).fetchone()
    after = Ledger.read(view)
    initial = before.initial()
    products = set(after.stock) | set(after.moved) | set(after.ordered)
    unbalanced = sorted(
        p
        for p in products
        if after.stock.get(p, 0) + after.moved.get(p, 0) != initial.get(p, 0)
        or after.moved.get(p, 0) != after.ordered.get(p, 0)
    )
    lost = sorted(set(ids) - set(present))
    result = {
        "acknowledged": len(acks),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "duplicates": sum(c - 1 for c in present.values()) + int(twice[0] if twice else 0),
        "unbalanced_products": unbalanced[:20],
        "oversold_products": sorted(p for p, s in after.stock.items() if s < 0)[:20],
        "prepared": view.prepared_count(),
    }
    result["ok"] = not (
        result["lost"]
        or result["duplicates"]
        or unbalanced
        or result["oversold_products"]
        or result["prepared"]
    )
    return result
