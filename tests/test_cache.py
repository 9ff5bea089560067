"""The two-level catalog cache: hits, invalidation, flush, and life without Redis."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from lab.process import wait_until
from lab.stack import Stack
from shop.cache import KEY_PREFIX
from tests.conftest import order


def cache_count(base_url: str, level: str, result: str) -> float:
    text = requests.get(f"{base_url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "shop_cache_requests":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels == {
                    "level": level,
                    "result": result,
                }:
                    return sample.value
    return 0.0


@pytest.fixture
def cache(stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.describe()["shop"]["redis_url"])
    yield client
    client.close()


def admin(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.admin_token}"}


def test_the_second_read_is_served_from_the_local_cache(
    shops: list[str], new_product: Callable[..., int], cache: redis.Redis
) -> None:
    product = new_product(stock=3)
    hits_before = cache_count(shops[0], "local", "hit")
    first = requests.get(f"{shops[0]}/products/{product}", timeout=5)
    second = requests.get(f"{shops[0]}/products/{product}", timeout=5)
    assert first.json() == second.json()
    assert first.json()["stock"] == 3
    assert cache_count(shops[0], "local", "hit") == hits_before + 1
    assert cache.exists(f"{KEY_PREFIX}{product}")


def test_another_instance_finds_the_product_in_redis(
    shops: list[str], new_product: Callable[..., int]
) -> None:
    product = new_product(stock=3)
    requests.get(f"{shops[0]}/products/{product}", timeout=5)
    hits_before = cache_count(shops[1], "redis", "hit")
    assert requests.get(f"{shops[1]}/products/{product}", timeout=5).json()["stock"] == 3
    assert cache_count(shops[1], "redis", "hit") == hits_before + 1


def test_an_order_invalidates_the_cached_stock(
    shops: list[str], new_product: Callable[..., int], cache: redis.Redis
) -> None:
    product = new_product(stock=8)
    assert requests.get(f"{shops[0]}/products/{product}", timeout=5).json()["stock"] == 8
    assert order(shops[0], str(uuid.uuid4()), product, quantity=3).status_code == 201
    # At once on this instance (the product is dirty: read from the database)...
    assert requests.get(f"{shops[0]}/products/{product}", timeout=5).json()["stock"] == 5
    # ...and in Redis as soon as the write-behind delete ran: the other instance sees it.
    wait_until(
        lambda: requests.get(f"{shops[1]}/products/{product}", timeout=5).json()["stock"] == 5,
        timeout_s=5,
        what="the new stock on the other instance",
    )


def test_a_price_change_is_served_at_once_by_the_instance_that_made_it(
    stack: Stack, shops: list[str], new_product: Callable[..., int]
) -> None:
    product = new_product(stock=1, price_cents=100)
    assert requests.get(f"{shops[0]}/products/{product}", timeout=5).json()["price_cents"] == 100
    patched = requests.patch(
        f"{shops[0]}/admin/products/{product}",
        json={"price_cents": 175},
        headers=admin(stack),
        timeout=5,
    )
    assert patched.status_code == 200, patched.text
    assert requests.get(f"{shops[0]}/products/{product}", timeout=5).json()["price_cents"] == 175


def test_the_admin_endpoints_refuse_a_missing_or_wrong_token(
    shops: list[str], new_product: Callable[..., int]
) -> None:
    product = new_product(stock=1)
    no_token = requests.post(f"{shops[0]}/admin/cache/flush", timeout=5)
    wrong = requests.patch(
        f"{shops[0]}/admin/products/{product}",
        json={"price_cents": 1},
        headers={"Authorization": "Bearer nope"},
        timeout=5,
    )
    assert (no_token.status_code, wrong.status_code) == (401, 401)
    assert "token" in no_token.json()["error"]
    assert requests.get(f"{shops[0]}/products/{product}", timeout=5).json()["price_cents"] == 1000


def test_a_flush_empties_redis_and_the_local_level(
    stack: Stack, shops: list[str], new_product: Callable[..., int], cache: redis.Redis
) -> None:
    product = new_product(stock=2)
    requests.get(f"{shops[0]}/products/{product}", timeout=5)
    flushed = requests.post(f"{shops[0]}/admin/cache/flush", headers=admin(stack), timeout=5)
    assert flushed.status_code == 200
    assert flushed.json()["redis_keys_removed"] >= 1
    assert not cache.exists(f"{KEY_PREFIX}{product}")
    misses_before = cache_count(shops[0], "local", "miss")
    requests.get(f"{shops[0]}/products/{product}", timeout=5)
    assert cache_count(shops[0], "local", "miss") == misses_before + 1


def test_the_shop_keeps_serving_and_selling_with_redis_killed(
    stack: Stack, shops: list[str], new_product: Callable[..., int]
) -> None:
    product = new_product(stock=5)
    redis_proc = stack.processes["redis"]
    redis_proc.kill()
    try:
        response = requests.get(f"{shops[1]}/products/{product}", timeout=5)
        assert response.status_code == 200
        assert response.json()["stock"] == 5
        assert order(shops[1], str(uuid.uuid4()), product, quantity=2).status_code == 201
        ready = requests.get(f"{shops[1]}/readyz", timeout=5)
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["cache"]["ok"] is False
        assert cache_count(shops[1], "redis", "error") >= 1
    finally:
        stack.restart("redis")
    wait_until(
        lambda: requests.get(f"{shops[1]}/readyz", timeout=5).json()["status"] == "ready",
        timeout_s=10,
        what="readiness with Redis back",
    )


def test_a_product_stays_dirty_and_is_read_from_the_database_while_redis_is_unreachable(
    stack: Stack,
) -> None:
    from lab.layout import find_free_base_port
    from shop.cache import ProductCache

    dead = redis.Redis(port=find_free_base_port(), socket_connect_timeout=0.2)
    cache = ProductCache(dead, local_ttl_s=60, local_size=10, redis_ttl_s=60, retry_after_s=0.1)
    loads: list[int] = []

    def load() -> dict[str, int]:
        loads.append(1)
        return {"id": 1, "stock": len(loads)}

    assert cache.get(1, load) == {"id": 1, "stock": 1}
    cache.invalidate(1)
    assert cache.get(1, load) == {"id": 1, "stock": 2}  # from the loader, not a stale level
    assert cache.is_dirty(1)  # the delete failed: it will be retried, not forgotten
    dead.close()


def test_wrong_prices_written_into_redis_are_found_and_flushed_by_the_control_plane(
    stack: Stack, shops: list[str], new_product: Callable[..., int], cache: redis.Redis
) -> None:
    import json

    from tests.test_controlplane import Api

    product = new_product(stock=3, price_cents=4200)
    served = requests.get(f"{shops[0]}/products/{product}", timeout=5).json()
    assert served["price_cents"] == 4200
    # A stray script writes a wrong price under the shop's own key, with the shop's TTL.
    cache.set(f"{KEY_PREFIX}{product}", json.dumps({**served, "price_cents": 1}), ex=60)
    # shop-1 has never read it: it takes the poisoned value from Redis...
    assert requests.get(f"{shops[1]}/products/{product}", timeout=5).json()["price_cents"] == 1
    # ...until the cache_truth probe sees it and the flush policy drops both levels.
    wait_until(
        lambda: all(
            requests.get(f"{url}/products/{product}", timeout=5).json()["price_cents"] == 4200
            for url in shops
        ),
        timeout_s=30,
        what="the true price served again",
    )

    def flushed_by_policy() -> bool:
        flushes = Api(stack).get("/actions?action=cache_flush&limit=20")["actions"]
        return any(
            r["requested_by"] == "policy:flush-untrue-cache" and r["state"] == "succeeded"
            for r in flushes
        )

    # Its verify waits for the probe to pass again: succeeded a moment after the prices.
    wait_until(flushed_by_policy, timeout_s=30, what="the flush run succeeded")
