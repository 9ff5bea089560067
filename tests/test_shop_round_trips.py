"""The order path in few round trips: client-side bound statements sent together, overlapped
commits, batched cache invalidation; and the guarantees that must survive them."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import requests
from sqlalchemy import Engine

from lab.process import wait_until
from lab.stack import Stack
from shop.cache import KEY_PREFIX, ProductCache
from tests.conftest import Ledger, order, prepared_gids

AWKWARD_TEXT = {
    "customer": "O'Brien \\ \"Bobby\" '); DROP TABLE orders; --",
    "address": "Straße 1 — ☃, $$ dollar-quoted $$, E'\\x41', %s %d {}",
}


def test_text_with_quotes_backslashes_and_sql_is_stored_exactly_as_sent(
    shops: list[str], new_product: Callable[..., int], ledger: Callable[[int], Ledger]
) -> None:
    product = new_product(stock=3, price_cents=120)
    placed = order(shops[0], f"awkward-{uuid.uuid4()}", product, quantity=2, **AWKWARD_TEXT)
    assert placed.status_code == 201, placed.text
    body = placed.json()
    assert {k: body[k] for k in AWKWARD_TEXT} == AWKWARD_TEXT
    assert (body["unit_price_cents"], body["total_cents"]) == (120, 240)
    # What the shop answered is what the database stored, to the microsecond.
    stored = requests.get(f"{shops[1]}/orders/{body['id']}", timeout=5)
    assert stored.status_code == 200
    assert stored.json() == body
    books = ledger(product)
    assert (books.stock(), books.order_count(), books.moved_quantity()) == (1, 1, 2)


def test_refused_and_replayed_orders_leave_no_prepared_transaction_behind(
    shops: list[str],
    engines: dict[str, Engine],
    new_product: Callable[..., int],
    ledger: Callable[[int], Ledger],
) -> None:
    product = new_product(stock=1)
    key = f"once-{uuid.uuid4()}"
    statuses = [
        order(shops[0], key, product).status_code,  # sold: the last unit
        order(shops[0], key, product).status_code,  # the retry: a replay
        order(shops[0], key, product, quantity=2).status_code,  # the key with another body
        order(shops[0], f"more-{uuid.uuid4()}", product).status_code,  # out of stock
        order(shops[0], f"none-{uuid.uuid4()}", 2**31 - 1).status_code,  # no such product
    ]
    assert statuses == [201, 201, 422, 409, 404]
    assert prepared_gids(engines, "shop:shop-0:") == []
    books = ledger(product)
    assert (books.stock(), books.order_count(), books.moved_quantity()) == (0, 1, 1)


class CountingRedis(redis.Redis):
    """A real client that counts the DELs it sends."""

    deletes = 0

    def delete(self, *names: Any) -> Any:
        self.deletes += 1
        return super().delete(*names)


@pytest.fixture
def counting_cache(stack: Stack) -> Iterator[CountingRedis]:
    url = stack.describe()["shop"]["redis_url"]
    client = CountingRedis(connection_pool=redis.ConnectionPool.from_url(url))
    yield client
    client.close()


def test_invalidations_within_the_batch_window_leave_redis_in_one_delete(
    counting_cache: CountingRedis,
) -> None:
    cache = ProductCache(
        counting_cache,
        local_ttl_s=60,
        local_size=10,
        redis_ttl_s=60,
        retry_after_s=1,
        batch_window_s=0.3,
    )
    ids = [10_000_000 + n for n in range(3)]
    for product_id in ids:
        assert cache.get(product_id, functools.partial(dict, id=product_id)) == {"id": product_id}
    assert all(counting_cache.exists(f"{KEY_PREFIX}{p}") for p in ids)

    for product_id in ids:
        cache.invalidate(product_id)
    # Dirty at once: this instance reads them from the database until Redis has dropped them.
    assert all(cache.is_dirty(p) for p in ids)
    wait_until(lambda: not any(cache.is_dirty(p) for p in ids), timeout_s=5, what="the batched DEL")
    assert not any(counting_cache.exists(f"{KEY_PREFIX}{p}") for p in ids)
    assert counting_cache.deletes == 1
