"""The catalog cache: an in-process LRU+TTL level in front of a shared Redis level.

Redis is never a single point of failure: any Redis error counts as a miss (and an error), and
after one Redis stays skipped for `retry_after_s` so a dead or hung Redis costs no latency.

Invalidation is write-behind: the product leaves the local level at once and is marked dirty;
a background thread deletes dirty keys from Redis in batches (one DEL for many orders): woken by
the first invalidation, it waits `batch_window_s` for more before it deletes, so under load it
wakes and sends a DEL a few dozen times a second rather than once per order. Until
its key is deleted, a dirty product is read from the database, never from Redis, so this
instance never serves the copy it has just made stale. A failed delete stays dirty and is
retried.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from cachetools import TTLCache
from prometheus_client import Counter

logger = logging.getLogger(__name__)

KEY_PREFIX = "shop:product:"

CACHE_REQUESTS = Counter(
    "shop_cache_requests_total", "Catalog cache look-ups by level and result", ["level", "result"]
)

Loader = Callable[[], dict[str, Any] | None]


class ProductCache:
    def __init__(
        self,
        client: redis.Redis,
        *,
        local_ttl_s: float,
        local_size: int,
        redis_ttl_s: int,
        retry_after_s: float,
        batch_window_s: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.local: TTLCache[int, dict[str, Any]] = TTLCache(local_size, local_ttl_s)
        self.lock = threading.Lock()
        self.redis_ttl_s = redis_ttl_s
        self.retry_after_s = retry_after_s
        self.batch_window_s = batch_window_s
        self.clock = clock
        self._skip_redis_until = 0.0
        self._dirty: set[int] = set()
        self._wake = threading.Event()
        self._invalidator: threading.Thread | None = None

    def get(self, product_id: int, load: Loader) -> dict[str, Any] | None:
        with self.lock:
            product = self.local.get(product_id)
        if product is not None:
            CACHE_REQUESTS.labels("local", "hit").inc()
            return product
        CACHE_REQUESTS.labels("local", "miss").inc()
        with self.lock:
            dirty = product_id in self._dirty
        product = None if dirty else self._redis_get(product_id)
        if product is None:
            product = load()
            if product is None:
                return None
            if not dirty:
                self._redis_set(product_id, product)
        with self.lock:
            self.local[product_id] = product
        return product

    def invalidate(self, product_id: int) -> None:
        with self.lock:
            self.local.pop(product_id, None)
            self._dirty.add(product_id)
            if self._invalidator is None:  # started lazily: after gunicorn forks the worker
                self._invalidator = threading.Thread(
                    target=self._delete_dirty_forever, name="cache-invalidator", daemon=True
                )
                self._invalidator.start()
        self._wake.set()

    def is_dirty(self, product_id: int) -> bool:
        with self.lock:
            return product_id in self._dirty

    def _delete_dirty_forever(self) -> None:
        while True:
            self._wake.wait()
            if self.batch_window_s:
                time.sleep(self.batch_window_s)  # let more invalidations join this DEL
            self._wake.clear()
            try:
                self.delete_dirty()
            except Exception:  # the loop's catch-all: log, keep the keys dirty, go on
                logger.exception("cache invalidation failed; will retry")
                time.sleep(1.0)
                self._wake.set()

    def delete_dirty(self) -> int:
        """One DEL for every key marked dirty so far; returns how many were settled."""
        with self.lock:
            batch = list(self._dirty)
        if not batch:
            return 0
        keys = [KEY_PREFIX + str(product_id) for product_id in batch]
        if self._redis_call(lambda: self.client.delete(*keys), force=True) is None:
            time.sleep(min(self.retry_after_s, 1.0))  # Redis down: keep them dirty, retry
            self._wake.set()
            return 0
        with self.lock:
            self._dirty.difference_update(batch)
        return len(batch)

    def flush(self) -> int:
        """Empty both levels; returns the number of Redis keys removed (-1 if Redis is down)."""
        with self.lock:
            self.local.clear()

        def delete_all() -> int:
            removed = 0
            batch: list[Any] = []
            for key in self.client.scan_iter(match=KEY_PREFIX + "*", count=500):
                batch.append(key)
                if len(batch) >= 500:
                    removed += int(self.client.delete(*batch))
                    batch.clear()
            if batch:
                removed += int(self.client.delete(*batch))
            return removed

        result = self._redis_call(delete_all, force=True)
        return -1 if result is None else int(result)

    def is_redis_up(self) -> bool:
        return bool(self._redis_call(self.client.ping, force=True))

    # -- Redis level -------------------------------------------------------------------------
    def _redis_get(self, product_id: int) -> dict[str, Any] | None:
        raw = self._redis_call(lambda: self.client.get(KEY_PREFIX + str(product_id)))
        if raw is None:
            CACHE_REQUESTS.labels("redis", "miss").inc()
            return None
        CACHE_REQUESTS.labels("redis", "hit").inc()
        value: dict[str, Any] = json.loads(raw)
        return value

    def _redis_set(self, product_id: int, product: dict[str, Any]) -> None:
        payload = json.dumps(product, separators=(",", ":"))
        self._redis_call(
            lambda: self.client.set(KEY_PREFIX + str(product_id), payload, ex=self.redis_ttl_s)
        )

    def _redis_call(self, call: Callable[[], Any], *, force: bool = False) -> Any:
        if not force and self.clock() < self._skip_redis_until:
            return None
        try:
            result = call()
        except redis.RedisError as exc:
            CACHE_REQUESTS.labels("redis", "error").inc()
            self._skip_redis_until = self.clock() + self.retry_after_s
            logger.warning("redis unavailable (%s); serving from the database", exc)
            return None
        self._skip_redis_until = 0.0
        return result
