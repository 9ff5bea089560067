"""Settling this instance's in-doubt transactions at start-up (and from the CLI)."""

from __future__ import annotations

import logging

from shop.config import ShopSettings
from shop.db import make_engine
from shop.orders import OrderCoordinator, Resolution

logger = logging.getLogger(__name__)


def resolve_own_in_doubt(
    settings: ShopSettings | None = None, *, all_instances: bool = False, min_age_s: float = 0.0
) -> list[Resolution]:
    settings = settings or ShopSettings.from_env()
    orders = make_engine(settings.orders_url, settings, role="orders")
    inventory = make_engine(settings.inventory_url, settings, role="inventory")
    try:
        coordinator = OrderCoordinator(orders, inventory, instance_id=settings.instance_id)
        resolutions = coordinator.resolve_in_doubt(min_age_s=min_age_s, only_own=not all_instances)
    finally:
        orders.dispose()
        inventory.dispose()
    logger.info("resolved %d in-doubt transaction(s)", len(resolutions))
    return resolutions
