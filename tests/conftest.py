"""Session fixtures: one real lab stack (PostgreSQL primary + standby, Redis, Prometheus,
Alertmanager, two shops) on free loopback ports, and helpers to read its databases."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, func, insert, select, text

from lab.layout import StackLayout, find_free_base_port
from lab.stack import Stack
from shop.db import make_engine
from shop.models import Order, Product, StockAdjustment, StockMovement


@contextlib.contextmanager
def stack_of_its_own(name: str, **stack_args: Any) -> Iterator[Stack]:
    """A two-shop stack (a module of its own when its tests move the primary or rewrite the
    data). Its logs and state store are kept in /tmp/<name>-logs for a failed run's post-mortem (CI
    prints nothing else of the servers)."""
    data_dir = lab_tmpdir(f"{name}-")
    lab = Stack(StackLayout(data_dir, find_free_base_port(), shop_count=2), **stack_args)
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()
        kept = Path(f"/tmp/{name}-logs")
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(lab.layout.logs, kept, dirs_exist_ok=True)
        with contextlib.suppress(OSError):
            for db in ("state.db", "state.db-wal"):
                shutil.copy(data_dir / "controlplane" / db, kept / db)
        shutil.rmtree(data_dir, ignore_errors=True)


def lab_tmpdir(prefix: str) -> Path:
    # Under /tmp with 0755: the postgres OS user must be able to reach its data directory.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The stack most tests share (logs kept in /tmp/shop-lab-logs afterwards)."""
    with stack_of_its_own("shop-lab", products=50) as lab:
        yield lab


@pytest.fixture(scope="session")
def shops(stack: Stack) -> list[str]:
    instances: list[str] = stack.describe()["shop"]["instances"]
    return instances


@pytest.fixture(scope="session")
def engines(stack: Stack) -> Iterator[dict[str, Engine]]:
    settings = stack.shop_settings(instance_id="tests")
    built = {
        "orders": make_engine(settings.orders_url, settings, role="tests", with_deadline=False),
        "inventory": make_engine(
            settings.inventory_url, settings, role="tests", with_deadline=False
        ),
    }
    yield built
    for engine in built.values():
        engine.dispose()


@pytest.fixture
def new_product(engines: dict[str, Engine]) -> Callable[..., int]:
    """Each test works on products of its own, so tests never see each other's orders."""

    def make(stock: int, price_cents: int = 1000) -> int:
        with engines["inventory"].begin() as conn:
            sku = f"T-{uuid.uuid4().hex[:16]}"
            product_id: int = conn.execute(
                insert(Product)
                .values(sku=sku, name=f"test {sku}", price_cents=price_cents, stock=stock)
                .returning(Product.id)
            ).scalar_one()
            conn.execute(  # its stock in the ledger, as the shop's seeding does
                insert(StockAdjustment).values(product_id=product_id, delta=stock, reason="initial")
            )
        return product_id

    return make


class Ledger:
    """What both databases say about one product: the invariants the tests check."""

    def __init__(self, engines: dict[str, Engine], product_id: int) -> None:
        self.engines = engines
        self.product_id = product_id

    def stock(self) -> int:
        with self.engines["inventory"].connect() as conn:
            stock: int = conn.execute(
                select(Product.stock).where(Product.id == self.product_id)
            ).scalar_one()
        return stock

    def ordered_quantity(self) -> int:
        with self.engines["orders"].connect() as conn:
            total: int = conn.execute(
                select(func.coalesce(func.sum(Order.quantity), 0)).where(
                    Order.product_id == self.product_id
                )
            ).scalar_one()
        return total

    def order_count(self) -> int:
        with self.engines["orders"].connect() as conn:
            count: int = conn.execute(
                select(func.count()).where(Order.product_id == self.product_id)
            ).scalar_one()
        return count

    def moved_quantity(self) -> int:
        with self.engines["inventory"].connect() as conn:
            total: int = conn.execute(
                select(func.coalesce(func.sum(-StockMovement.delta), 0)).where(
                    StockMovement.product_id == self.product_id
                )
            ).scalar_one()
        return total


@pytest.fixture
def ledger(engines: dict[str, Engine]) -> Callable[[int], Ledger]:
    return lambda product_id: Ledger(engines, product_id)


def order(
    base_url: str, key: str, product_id: int, quantity: int = 1, **extra: Any
) -> requests.Response:
    body = {"product_id": product_id, "quantity": quantity, "customer": "ann", "address": "1 Rd"}
    body.update(extra)
    return requests.post(
        f"{base_url}/orders", json=body, headers={"Idempotency-Key": key}, timeout=30
    )


def prepared_gids(engines: dict[str, Engine], prefix: str) -> list[str]:
    with engines["orders"].connect() as conn:
        rows = conn.execute(
            text("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE :p"), {"p": prefix + "%"}
        )
        return [r[0] for r in rows]
