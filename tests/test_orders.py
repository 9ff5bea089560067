"""Orders through the real shop: no oversell, exactly-once with idempotency keys, clean 4xx."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.conftest import Ledger, order


def test_an_order_is_written_to_both_databases_and_decrements_stock(
    shops: list[str], new_product: Callable[..., int], ledger: Callable[[int], Ledger]
) -> None:
    product = new_product(stock=10, price_cents=250)
    response = order(shops[0], str(uuid.uuid4()), product, quantity=3)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["quantity"] == 3
    assert body["total_cents"] == 750
    assert response.headers["Idempotent-Replayed"] == "false"
    books = ledger(product)
    assert (books.stock(), books.ordered_quantity(), books.moved_quantity()) == (7, 3, 3)
    fetched = requests.get(f"{shops[1]}/orders/{body['id']}", timeout=5)
    assert fetched.status_code == 200
    assert fetched.json()["id"] == body["id"]


def test_64_concurrent_buyers_never_oversell_scarce_stock(
    shops: list[str], new_product: Callable[..., int], ledger: Callable[[int], Ledger]
) -> None:
    product = new_product(stock=20)

    def buy(n: int) -> int:
        quantity = 1 + n % 2
        return order(shops[n % len(shops)], f"buyer-{uuid.uuid4()}", product, quantity).status_code

    with ThreadPoolExecutor(max_workers=64) as pool:
        statuses = list(pool.map(buy, range(64)))

    assert set(statuses) <= {201, 409}, statuses
    assert statuses.count(201) > 0 and statuses.count(409) > 0
    books = ledger(product)
    sold = books.ordered_quantity()
    assert books.stock() >= 0
    assert sold == 20 - books.stock()
    assert books.moved_quantity() == sold
    assert books.order_count() == statuses.count(201)


def test_a_key_retried_concurrently_creates_exactly_one_order(
    shops: list[str], new_product: Callable[..., int], ledger: Callable[[int], Ledger]
) -> None:
    product = new_product(stock=5)
    key = f"retry-{uuid.uuid4()}"

    def attempt(n: int) -> requests.Response:
        return order(shops[n % len(shops)], key, product, quantity=2)

    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(attempt, range(16)))

    assert {r.status_code for r in responses} == {201}, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert [r.headers["Idempotent-Replayed"] for r in responses].count("false") == 1
    books = ledger(product)
    assert (books.order_count(), books.stock(), books.moved_quantity()) == (1, 3, 2)


def test_a_retry_returns_the_first_result_even_after_the_stock_ran_out(
    shops: list[str], new_product: Callable[..., int], ledger: Callable[[int], Ledger]
) -> None:
    product = new_product(stock=1)
    first = order(shops[0], "last-unit-" + str(product), product)
    again = order(shops[1], "last-unit-" + str(product), product)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert ledger(product).order_count() == 1


def test_a_key_reused_with_another_body_is_refused(
    shops: list[str], new_product: Callable[..., int], ledger: Callable[[int], Ledger]
) -> None:
    product = new_product(stock=5)
    key = f"reuse-{uuid.uuid4()}"
    assert order(shops[0], key, product, quantity=1).status_code == 201
    reused = order(shops[0], key, product, quantity=2)
    assert reused.status_code == 422
    assert "different request body" in reused.json()["error"]
    assert ledger(product).ordered_quantity() == 1


def test_an_order_larger_than_the_stock_is_409_and_writes_nothing(
    shops: list[str], new_product: Callable[..., int], ledger: Callable[[int], Ledger]
) -> None:
    product = new_product(stock=2)
    response = order(shops[0], str(uuid.uuid4()), product, quantity=3)
    assert response.status_code == 409
    assert "in stock" in response.json()["error"]
    books = ledger(product)
    assert (books.stock(), books.order_count(), books.moved_quantity()) == (2, 0, 0)


def _post(url: str, data: Any, headers: dict[str, str]) -> requests.Response:
    return requests.post(f"{url}/orders", data=data, headers=headers, timeout=10)


VALID = '{"product_id": %d, "quantity": 1, "customer": "ann", "address": "1 Rd"}'
KEY = {"Idempotency-Key": "bad-input", "Content-Type": "application/json"}

BAD_INPUTS = {
    "malformed JSON": ('{"product_id": %d, "quantity": ', KEY, 400),
    "a JSON array": ("[%d]", KEY, 400),
    "missing fields": ('{"product_id": %d}', KEY, 400),
    "a negative quantity": (VALID.replace('"quantity": 1', '"quantity": -1'), KEY, 400),
    "a zero quantity": (VALID.replace('"quantity": 1', '"quantity": 0'), KEY, 400),
    "a string quantity": (VALID.replace('"quantity": 1', '"quantity": "lots"'), KEY, 400),
    "an empty customer": (VALID.replace('"ann"', '""'), KEY, 400),
    "an unknown field": (VALID.replace("}", ', "discount": 100}'), KEY, 400),
    "no idempotency key": (VALID, {"Content-Type": "application/json"}, 400),
    "an unknown product": (VALID.replace("%d", "999999"), KEY, 404),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_gets_a_json_4xx_and_writes_nothing(
    case: str,
    shops: list[str],
    new_product: Callable[..., int],
    ledger: Callable[[int], Ledger],
) -> None:
    template, headers, expected = BAD_INPUTS[case]
    product = new_product(stock=5)
    body = template % product if "%d" in template else template
    headers = (
        {**headers, "Idempotency-Key": f"bad-{uuid.uuid4()}"}
        if "Idempotency-Key" in headers
        else headers
    )
    response = _post(shops[0], body, headers)
    assert response.status_code == expected, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert isinstance(response.json()["error"], str) and response.json()["error"]
    books = ledger(product)
    assert (books.stock(), books.order_count(), books.moved_quantity()) == (5, 0, 0)


def test_an_unknown_route_and_a_bad_order_id_get_json_errors(shops: list[str]) -> None:
    missing = requests.get(f"{shops[0]}/nowhere", timeout=5)
    assert missing.status_code == 404 and "error" in missing.json()
    bad_id = requests.get(f"{shops[0]}/orders/not-a-uuid", timeout=5)
    assert bad_id.status_code == 400 and "UUID" in bad_id.json()["error"]
    unknown = requests.get(f"{shops[0]}/orders/{uuid.uuid4()}", timeout=5)
    assert unknown.status_code == 404 and "not found" in unknown.json()["error"]
