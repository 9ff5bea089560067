"""Creating the shop's schema in both databases, and seeding the catalog."""

from __future__ import annotations

import random

from sqlalchemy import Engine, func, insert, select

from shop.models import InventoryBase, OrdersBase, Product, StockAdjustment


def create_schema(orders: Engine, inventory: Engine) -> None:
    """Idempotent: creates what is missing, touches nothing that exists."""
    OrdersBase.metadata.create_all(orders)
    InventoryBase.metadata.create_all(inventory)


def seed_products(
    inventory: Engine, *, count: int = 1000, stock: int = 100, rng_seed: int = 7
) -> int:
    """Adds products until the catalog holds `count`; returns how many were added."""
    rng = random.Random(rng_seed)
    with inventory.begin() as conn:
        existing = conn.execute(select(func.count()).select_from(Product)).scalar_one()
        rows = [
            {
                "sku": f"SKU-{n:06d}",
                "name": f"Product {n}",
                "price_cents": rng.randrange(199, 19999),
                "stock": stock,
            }
            for n in range(existing + 1, count + 1)
        ]
        if rows:
            ids = conn.execute(insert(Product).returning(Product.id), rows).scalars().all()
            # The initial stock is the ledger's first entry for each product.
            conn.execute(
                insert(StockAdjustment),
                [{"product_id": i, "delta": stock, "reason": "initial"} for i in ids],
            )
    return len(rows)
