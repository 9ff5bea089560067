"""The shop's Flask app: catalog, orders, health, readiness, metrics and admin endpoints."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any, cast

import psycopg
import redis
from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Table, insert, select, text, update
from sqlalchemy.exc import DataError, SQLAlchemyError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.routing import IntegerConverter

from shop.cache import ProductCache
from shop.config import ShopSettings
from shop.db import make_engine
from shop.errors import (
    BadRequest,
    OrderNotFound,
    ProductNotFound,
    ShopError,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from shop.metrics import DB_ERRORS, ORDERS, REQUEST_SECONDS, InDoubtCollector, register_in_doubt
from shop.models import Order, Product, StockAdjustment
from shop.orders import OrderCoordinator, OrderRequest, order_json

logger = logging.getLogger(__name__)

MAX_PAGE = 500
MAX_BODY_BYTES = 64 * 1024  # an order is a few hundred bytes
MAX_DEPTH = 16
MAX_INT4 = 2**31 - 1  # product ids are PostgreSQL integers: beyond them, nothing exists
# Exactly `Bearer <token>`: one space, the token visible ASCII, nothing else.
BEARER = re.compile(r"Bearer ([!-~]+)")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
C0 = re.compile(r"[\x00-\x1f\x7f]")
# The methods the metrics name; any other (a client may send any token: "QQQ", "A1") is
# "other", so that requests cannot mint new time series without bound.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
products = cast(Table, Product.__table__)
adjustments = cast(Table, StockAdjustment.__table__)
orders = cast(Table, Order.__table__)


class OrderBody(BaseModel):
    # Strict: JSON's own types only. `true` is no quantity, nor "1" a product id.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True)

    product_id: int = Field(gt=0, lt=2**31)
    quantity: int = Field(gt=0, le=1000)
    customer: str = Field(min_length=1, max_length=200)
    address: str = Field(min_length=1, max_length=500)


class ProductPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    price_cents: int | None = Field(default=None, ge=0, lt=2**31)
    stock: int | None = Field(default=None, ge=0, lt=2**31)


PRODUCT_FIELDS = ("id", "sku", "name", "price_cents", "stock")


def product_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {name: row[name] for name in PRODUCT_FIELDS}


def validation_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
    )


def printable(value: object, limit: int = 500) -> str:
    """A value that came from outside, on one log line: control characters escaped."""
    text = str(value)[:limit]
    return CONTROL.sub(
        lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text
    )


class ProductId(IntegerConverter):
    """`<product_id:…>`: a positive PostgreSQL integer; anything else is a 404 before any
    query (an id the database cannot hold is not a database outage)."""

    def __init__(self, map: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(map, min=1, max=MAX_INT4)


def json_body() -> dict[str, Any]:
    """The body: `application/json`, bounded in size and depth, a JSON object whose strings
    are valid Unicode without NUL (PostgreSQL text cannot hold either)."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("the body must be application/json")
    try:
        raw = request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise TooLarge(f"the body is larger than {MAX_BODY_BYTES} bytes") from None
    finally:
        # The request's latency is the shop's own time, from its whole body on: a client slow
        # to send it (a bad line, or on purpose) is no slow shop, and must not fire an alert.
        g.started_at = time.perf_counter()
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest(f"the body is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError among them
        raise BadRequest(f"malformed JSON body: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    check_values(body)
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_values(body: Any) -> None:
    """Without recursion: depth, and every string (keys too) storable as PostgreSQL text."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"the body is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            for key, value in item.items():
                check_text(key)
                stack.append((value, depth + 1))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            check_text(item)


def check_text(value: str) -> None:
    if "\x00" in value:
        raise BadRequest("text must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("text must be valid Unicode (a lone surrogate)") from None


def create_app(settings: ShopSettings | None = None) -> Flask:
    settings = settings or ShopSettings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.url_map.converters["product_id"] = ProductId
    orders_db = make_engine(settings.orders_url, settings, role="orders")
    inventory_db = make_engine(settings.inventory_url, settings, role="inventory")
    redis_client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        # One attempt: a dead or hung Redis costs one timeout, then the cache skips it for
        # `redis_retry_after_s` (redis-py would otherwise retry three times on its own).
        retry=Retry(NoBackoff(), 0),
    )
    cache = ProductCache(
        redis_client,
        local_ttl_s=settings.local_cache_ttl_s,
        local_size=settings.local_cache_size,
        redis_ttl_s=settings.redis_cache_ttl_s,
        retry_after_s=settings.redis_retry_after_s,
        batch_window_s=settings.redis_invalidate_batch_s,
    )
    coordinator = OrderCoordinator(
        orders_db,
        inventory_db,
        instance_id=settings.instance_id,
        retry_deadline_s=settings.db_retry_deadline_s,
        failpoint=settings.failpoint,
    )
    register_in_doubt(
        InDoubtCollector(
            lambda: coordinator.count_in_doubt(min_age_s=settings.in_doubt_min_age_s),
            settings.in_doubt_min_age_s,
        )
    )
    app.extensions["shop"] = {
        "settings": settings,
        "coordinator": coordinator,
        "cache": cache,
        "engines": (orders_db, inventory_db),
    }

    def load_product(product_id: int) -> dict[str, Any] | None:
        with inventory_db.connect() as conn:
            row = conn.execute(products.select().where(products.c.id == product_id))
            found = row.mappings().first()
        return None if found is None else product_json(found)

    # -- request bookkeeping and errors ----------------------------------------------------
    @app.before_request
    def start_timer() -> None:
        g.started_at = time.perf_counter()

    @app.after_request
    def observe(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        elapsed = time.perf_counter() - g.get("started_at", time.perf_counter())
        method = request.method if request.method in METHODS else "other"
        REQUEST_SECONDS.labels(method, route, str(response.status_code)).observe(elapsed)
        return response

    @app.errorhandler(ShopError)
    def shop_error(exc: ShopError) -> tuple[Response, int]:
        return jsonify(error=exc.message), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return jsonify(error=exc.description or exc.name), exc.code or 500

    @app.errorhandler(SQLAlchemyError)
    def db_error(exc: SQLAlchemyError) -> tuple[Response, int]:
        if isinstance(exc, DataError):
            # The database refused a value (out of range, NUL): bad input, not an outage.
            logger.warning("database refused a value: %s", printable(exc.orig))
            return jsonify(error="a value in the request is out of range or not text"), 400
        DB_ERRORS.labels(type(exc).__name__).inc()
        logger.warning("database error: %s", printable(exc))
        return jsonify(error="database unavailable, retry shortly"), 503

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        logger.exception("unhandled error")
        return jsonify(error="internal error"), 500

    # -- catalog ---------------------------------------------------------------------------
    @app.get("/products")
    def list_products() -> Response:
        try:
            limit = min(int(request.args.get("limit", 50)), MAX_PAGE)
            after = int(request.args.get("after", 0))
        except ValueError:
            raise BadRequest("limit and after must be integers") from None
        if limit < 1:
            raise BadRequest("limit must be at least 1")
        if not 0 <= after <= MAX_INT4:
            raise BadRequest(f"after must be between 0 and {MAX_INT4}")
        with inventory_db.connect() as conn:
            rows = conn.execute(
                products.select().where(products.c.id > after).order_by(products.c.id).limit(limit)
            ).mappings()
            page = [product_json(p) for p in rows]
        return jsonify(products=page, next_after=page[-1]["id"] if page else None)

    @app.get("/products/<product_id:product_id>")
    def get_product(product_id: int) -> Response:
        product = cache.get(product_id, lambda: load_product(product_id))
        if product is None:
            raise ProductNotFound(f"product {product_id} does not exist")
        return jsonify(product)

    # -- orders ----------------------------------------------------------------------------
    @app.post("/orders")
    def create_order() -> tuple[Response, int, dict[str, str]]:
        key = request.headers.get("Idempotency-Key", "").strip()
        if not key or len(key) > 255 or C0.search(key):
            ORDERS.labels("bad_request").inc()
            raise BadRequest(
                "an Idempotency-Key header (1 to 255 characters, no control characters) is required"
            )
        try:
            body = OrderBody.model_validate(json_body())
        except ValidationError as exc:
            ORDERS.labels("bad_request").inc()
            raise BadRequest(validation_message(exc)) from None
        except ShopError:  # BadRequest, TooLarge, UnsupportedMediaType
            ORDERS.labels("bad_request").inc()
            raise
        try:
            placed = coordinator.place(
                OrderRequest(body.product_id, body.quantity, body.customer, body.address), key
            )
        except ShopError as exc:
            if isinstance(exc, Unavailable) and isinstance(exc.__cause__, psycopg.DataError):
                # The database refused a value of the request: bad input, not an outage.
                ORDERS.labels("bad_request").inc()
                raise BadRequest("a value in the order is out of range or not text") from exc
            ORDERS.labels(type(exc).__name__).inc()
            if isinstance(exc, Unavailable):
                DB_ERRORS.labels("order").inc()
            raise
        ORDERS.labels("replayed" if placed.replayed else "created").inc()
        if not placed.replayed:
            cache.invalidate(placed.product_id)
        headers = {"Idempotent-Replayed": "true" if placed.replayed else "false"}
        return jsonify(placed.order), 201, headers

    @app.get("/orders/<order_id>")
    def get_order(order_id: str) -> Response:
        try:
            oid = uuid.UUID(order_id)
        except ValueError:
            raise BadRequest("order id must be a UUID") from None
        with orders_db.connect() as conn:
            row = conn.execute(orders.select().where(orders.c.id == oid)).mappings().first()
        if row is None:
            raise OrderNotFound(f"order {order_id} not found")
        return jsonify(order_json(dict(row)))

    # -- health ----------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="alive", instance=settings.instance_id)

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        checks: dict[str, dict[str, Any]] = {}
        for name, engine in (("orders", orders_db), ("inventory", inventory_db)):
            started = time.perf_counter()
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                checks[name] = {"ok": True}
            except SQLAlchemyError as exc:
                DB_ERRORS.labels("readiness").inc()
                checks[name] = {"ok": False, "error": type(exc.__cause__ or exc).__name__}
            checks[name]["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
        checks["cache"] = {"ok": cache.is_redis_up()}
        ready = checks["orders"]["ok"] and checks["inventory"]["ok"]
        status = "not_ready" if not ready else ("ready" if checks["cache"]["ok"] else "degraded")
        body = jsonify(status=status, instance=settings.instance_id, checks=checks)
        return body, 200 if ready else 503

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)

    # -- admin -----------------------------------------------------------------------------
    def require_admin() -> None:
        found = BEARER.fullmatch(request.headers.get("Authorization", ""))
        if (
            not settings.admin_token
            or found is None
            or not hmac.compare_digest(found.group(1).encode(), settings.admin_token.encode())
        ):
            raise Unauthorized("a valid admin bearer token is required (Authorization: Bearer …)")

    @app.post("/admin/cache/flush")
    def flush_cache() -> Response:
        require_admin()
        removed = cache.flush()
        return jsonify(
            flushed=True, local=True, redis_keys_removed=removed, instance=settings.instance_id
        )

    @app.patch("/admin/products/<product_id:product_id>")
    def patch_product(product_id: int) -> Response:
        require_admin()
        try:
            patch = ProductPatch.model_validate(json_body())
        except ValidationError as exc:
            raise BadRequest(validation_message(exc)) from None
        values = patch.model_dump(exclude_none=True)
        if not values:
            raise BadRequest("nothing to change: give price_cents and/or stock")
        with inventory_db.begin() as conn:
            before = conn.execute(
                select(products.c.stock).where(products.c.id == product_id).with_for_update()
            ).first()
            if before is None:
                raise ProductNotFound(f"product {product_id} does not exist")
            conn.execute(
                update(products)
                .where(products.c.id == product_id)
                .values(**values, updated_at=text("now()"))
            )
            if "stock" in values and values["stock"] != before.stock:
                # In the ledger, in the same transaction: a restock is not damage.
                conn.execute(
                    insert(adjustments).values(
                        product_id=product_id, delta=values["stock"] - before.stock, reason="admin"
                    )
                )
        cache.invalidate(product_id)
        product = load_product(product_id)
        return jsonify(product)

    return app
