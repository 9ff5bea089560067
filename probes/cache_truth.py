"""CacheTruthProbe: does the shared catalog cache say what the database says? Cached products
(Redis keys under the shop's prefix) are compared with their rows on the primary, on the
fields an order never changes (sku, name, price). Each run reads up to `sample` keys, going on
where the last run's SCAN stopped, so a catalog of any size is covered within a few runs at a
bounded cost each. A stray script or a bad deploy that wrote wrong prices is DOWN; a Redis or
a database that cannot be read is UNKNOWN (their own probes report them); stock, which orders
move and the shop invalidates, is not judged."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import psycopg
import redis
from pydantic import Field
from redis.backoff import NoBackoff
from redis.retry import Retry

from pgcluster.nodes import session
from probes.base import Health, Params, Probe, ProbeResult, describe

# The fields of a product only its owner edits (and the shop invalidates on such an edit).
JUDGED = ("sku", "name", "price_cents")


class CacheTruthParams(Params):
    redis_url: str = Field(pattern=r"^rediss?://")
    inventory_dsn: str
    key_prefix: str = Field(default="shop:product:", min_length=1)
    sample: int = Field(default=1000, ge=1, le=10_000)  # keys read per run


class CacheTruthProbe(Probe):
    kind = "cache_truth"
    Params = CacheTruthParams
    unreachable: ClassVar[Health] = Health.UNKNOWN

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cursor = 0  # where the next run's SCAN goes on (0: from the start)

    def check(self) -> ProbeResult:
        p: CacheTruthParams = self.params  # type: ignore[assignment]
        try:
            cached, garbled = self._cached(p)
        except redis.RedisError as exc:
            return ProbeResult(self.unreachable, f"cannot read the cache: {describe(exc)}")
        if not cached and not garbled:
            return ProbeResult(Health.UP, "nothing cached", details={"sampled": 0})
        try:
            truth = self._truth(p, list(cached))
        except psycopg.Error as exc:
            return ProbeResult(self.unreachable, f"cannot read the catalog: {describe(exc)}")
        # A cached product the database does not have, or has otherwise, is served wrong.
        wrong = sorted(
            product_id
            for product_id, value in cached.items()
            if product_id not in truth or any(value.get(f) != truth[product_id][f] for f in JUDGED)
        )
        sampled = len(cached) + garbled
        details = {
            "sampled": sampled,
            "wrong": len(wrong),
            "garbled": garbled,
            "wrong_ids": wrong[:20],
        }
        if wrong or garbled:
            example = f"e.g. product {wrong[0]}" if wrong else "keys that are not products"
            return ProbeResult(
                Health.DOWN,
                f"{len(wrong) + garbled} of {sampled} cached products disagree with the "
                f"database ({example})",
                details=details,
            )
        return ProbeResult(Health.UP, f"{sampled} cached products agree", details=details)

    def _cached(self, p: CacheTruthParams) -> tuple[dict[int, dict[str, Any]], int]:
        """The sampled products by id, and how many keys under the prefix are no product."""
        client = redis.Redis.from_url(
            p.redis_url,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            keys: list[bytes | str] = []
            cursor = self._cursor
            while len(keys) < p.sample:
                cursor, found = client.scan(cursor, match=p.key_prefix + "*", count=500)
                keys.extend(found)
                if cursor == 0:  # the whole keyspace seen: the next run starts over
                    break
            values = client.mget(keys) if keys else []
        finally:
            client.close()
        self._cursor = int(cursor)
        cached: dict[int, dict[str, Any]] = {}
        garbled = 0
        for key, raw in zip(keys, values, strict=True):
            if raw is None:  # expired between the scan and the read
                continue
            name = key.decode(errors="replace") if isinstance(key, bytes) else key
            suffix = name[len(p.key_prefix) :]
            try:
                product_id, value = int(suffix), json.loads(raw)
            except (ValueError, RecursionError):  # not an id, or not JSON: served as garbage
                garbled += 1
                continue
            if isinstance(value, dict):
                cached[product_id] = value
            else:
                garbled += 1
        return cached, garbled

    def _truth(self, p: CacheTruthParams, ids: list[int]) -> dict[int, dict[str, Any]]:
        with session(p.inventory_dsn, self.timeout_s) as conn:
            rows = conn.execute(
                "SELECT id, sku, name, price_cents FROM products WHERE id = ANY(%s)", (ids,)
            ).fetchall()
        return {int(r[0]): {"sku": r[1], "name": r[2], "price_cents": r[3]} for r in rows}
