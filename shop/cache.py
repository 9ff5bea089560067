"""The catalog cache: an in-process LRU+TTL level in front of a shared Redis level.

Redis is never a single point of failure: any Redis error counts as a miss (and an error), and
after one Redis stays skipped for `retry_after_s` so a dead or hung Redis costs no latency.
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.local: TTLCache[int, dict[str, Any]] = TTLCache(local_size, local_ttl_s)
        self.lock = threading.Lock()
        self.redis_ttl_s = redis_ttl_s
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._skip_redis_until = 0.0

    def get(self, product_id: int, load: Loader) -> dict[str, Any] | None:
        with self.lock:
            product = self.local.get(product_id)
        if product is not None:
            CACHE_REQUESTS.labels("local", "hit").inc()
            return product
        CACHE_REQUESTS.labels("local", "miss").inc()
        product = self._redis_get(product_id)
        if product is None:
            product = load()
            if product is None:
                return None
            self._redis_set(product_id, product)
        with self.lock:
            self.local[product_id] = product
        return product

    def invalidate(self, product_id: int) -> None:
        with self.lock:
            self.local.pop(product_id, None)
        self._redis_call(lambda: self.client.delete(KEY_PREFIX + str(product_id)))

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
