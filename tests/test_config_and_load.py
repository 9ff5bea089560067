"""Configuration errors name the variable; the load generator stays on loopback and in time."""

from __future__ import annotations

import pytest

from lab.load import run_order_load
from shop.config import ConfigError, ShopSettings

BASE = {"SHOP_ORDERS_URL": "postgresql+psycopg://x@/orders", "SHOP_INVENTORY_URL": "p://i"}


def test_a_bad_shop_setting_fails_with_the_variable_name() -> None:
    with pytest.raises(ConfigError, match="SHOP_LOCAL_CACHE_TTL_S"):
        ShopSettings.from_env({**BASE, "SHOP_LOCAL_CACHE_TTL_S": "-1"})


def test_a_missing_database_url_is_named() -> None:
    with pytest.raises(ConfigError, match="SHOP_INVENTORY_URL"):
        ShopSettings.from_env({"SHOP_ORDERS_URL": "postgresql+psycopg://x@/orders"})


def test_an_unknown_failpoint_is_refused() -> None:
    with pytest.raises(ConfigError, match="SHOP_FAILPOINT"):
        ShopSettings.from_env({**BASE, "SHOP_FAILPOINT": "after_lunch"})


def test_settings_are_read_from_the_environment_once_and_frozen() -> None:
    settings = ShopSettings.from_env({**BASE, "SHOP_INSTANCE_ID": "shop-7"})
    assert settings.instance_id == "shop-7"
    with pytest.raises(ValueError, match="frozen"):
        settings.instance_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize("url", ["http://10.0.0.1:80", "http://example.com"])
def test_the_load_generator_refuses_addresses_off_loopback(url: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        run_order_load([url], clients=1, duration_s=1, product_ids=[1])


def test_the_load_generator_refuses_an_unbounded_duration() -> None:
    with pytest.raises(ValueError, match="duration_s"):
        run_order_load(["http://127.0.0.1:1"], clients=1, duration_s=86400, product_ids=[1])
