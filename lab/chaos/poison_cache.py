"""poison-cache: wrong prices written into Redis under the shop's own keys and TTL, as a bad
deploy or a stray script would. The products poisoned are ones the game day's load never
orders (`reserved_products`): an order invalidates its product's entry, and would wash the
poison out before anyone looked. So the control plane's `cache_truth` probe is what finds
them, and its flush policy what drops them. Recovered when no shop serves a price the
database denies."""

from __future__ import annotations

import json
from typing import ClassVar

import redis
import requests

from lab.chaos.base import BaseFault, FaultRecord, Stamp, record
from lab.observe import StackView
from shop.cache import KEY_PREFIX
from shop.config import ShopSettings

POISONED_PRICE_CENTS = 1
POISONED = frozenset(range(1, 21))  # the catalog's first products (seeded from id 1)


class PoisonCache(BaseFault):
    kind: ClassVar[str] = "poison-cache"
    expected_actions: ClassVar[frozenset[str]] = frozenset({"cache_flush"})
    reserved_products: ClassVar[frozenset[int]] = POISONED

    def __init__(self) -> None:
        self.poisoned: list[int] = []

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        shop = view.shop_urls()[0]
        client = redis.Redis.from_url(view.redis_url, socket_timeout=2)
        ttl_s = ShopSettings.model_fields["redis_cache_ttl_s"].default
        started = Stamp.now()
        try:
            for product_id in sorted(self.reserved_products):
                product = requests.get(f"{shop}/products/{product_id}", timeout=5).json()
                product["price_cents"] = POISONED_PRICE_CENTS
                client.set(KEY_PREFIX + str(product_id), json.dumps(product), ex=ttl_s)
                self.poisoned.append(product_id)
        finally:
            client.close()
        ended = Stamp.now()
        return record(self.kind, "redis", started, ended, products=self.poisoned, ttl_s=ttl_s)

    def is_recovered(self, view: StackView) -> bool:
        """Every shop serves every poisoned product at its price in the database."""
        with view.leader_db("inventory") as conn:
            rows = conn.execute(
                "SELECT id, price_cents FROM products WHERE id = ANY(%s)", (self.poisoned,)
            ).fetchall()
        truth = {int(r[0]): int(r[1]) for r in rows}
        for url in view.shop_urls():
            for product_id, price in truth.items():
                got = requests.get(f"{url}/products/{product_id}", timeout=5).json()
                if got.get("price_cents") != price:
                    return False
        return True
