"""The `shop` command: create the schema, seed the catalog, resolve in-doubt transactions."""

from __future__ import annotations

import dataclasses
import json
import logging

import click

from shop.config import ConfigError, ShopSettings
from shop.db import make_engine
from shop.recovery import resolve_own_in_doubt
from shop.schema import create_schema, seed_products


def load_settings() -> ShopSettings:
    try:
        return ShopSettings.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def main() -> None:
    """The bundled shop (configured by SHOP_* environment variables)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@main.command("init-db")
@click.option("--products", default=1000, show_default=True, help="catalog size to seed")
@click.option("--stock", default=100, show_default=True, help="initial stock per product")
def init_db(products: int, stock: int) -> None:
    """Create the tables (idempotent) and seed the catalog up to --products."""
    settings = load_settings()
    orders = make_engine(settings.orders_url, settings, role="orders", with_deadline=False)
    inventory = make_engine(settings.inventory_url, settings, role="inventory", with_deadline=False)
    create_schema(orders, inventory)
    added = seed_products(inventory, count=products, stock=stock)
    click.echo(f"schema ready; {added} products added")


@main.command("resolve-in-doubt")
@click.option("--all-instances", is_flag=True, help="also other instances' transactions")
@click.option("--min-age-s", default=0.0, show_default=True, help="leave younger ones alone")
def resolve_in_doubt(all_instances: bool, min_age_s: float) -> None:
    """Commit or roll back prepared transactions left by a crash, per the decision log."""
    resolutions = resolve_own_in_doubt(
        load_settings(), all_instances=all_instances, min_age_s=min_age_s
    )
    click.echo(json.dumps([dataclasses.asdict(r) for r in resolutions]))
