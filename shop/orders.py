"""Placing an order: one two-phase commit over `inventory` and `orders`, with a decision log.

The protocol (presumed abort), for transaction id `txid` = shop:<instance>:<order id>:
  1. inventory: guarded UPDATE of stock + INSERT movement (one statement),
                PREPARE TRANSACTION '<txid>:inventory'
  2. orders:    INSERT order (unique idempotency key), PREPARE TRANSACTION '<txid>:orders'
  3. orders:    INSERT INTO tx_decisions (txid, 'commit') ON CONFLICT DO NOTHING  <- the decision
  4. COMMIT PREPARED on inventory, then on orders
A crash before 3 leaves no decision: the resolver records 'abort' (first writer wins) and rolls
both back. A crash after 3 leaves 'commit': the resolver commits what is still prepared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors
from psycopg.rows import dict_row
from sqlalchemy import Engine
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from shop.db import forget_connections, is_busy, is_connection_lost, is_transient, raw_connection
from shop.errors import Busy, IdempotencyKeyReused, OutOfStock, ProductNotFound, Unavailable

logger = logging.getLogger(__name__)

GID_PREFIX = "shop:"

# The guarded decrement and its movement row in one statement (one round trip).
TAKE_STOCK = (
    "WITH taken AS (UPDATE products SET stock = stock - %s, updated_at = now()"
    " WHERE id = %s AND stock >= %s RETURNING id, price_cents)"
    " INSERT INTO stock_movements (order_id, product_id, delta)"
    " SELECT %s, id, %s FROM taken RETURNING (SELECT price_cents FROM taken)"
)

ORDER_COLUMNS = (
    "id, product_id, quantity, customer, address, unit_price_cents, total_cents, created_at,"
    " request_hash"
)


@dataclass(frozen=True, slots=True)
class OrderRequest:
    product_id: int
    quantity: int
    customer: str
    address: str

    def fingerprint(self) -> str:
        body = json.dumps(
            [self.product_id, self.quantity, self.customer, self.address], separators=(",", ":")
        )
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class PlacedOrder:
    order: dict[str, Any]
    replayed: bool
    product_id: int


@dataclass(frozen=True, slots=True)
class Resolution:
    database: str
    gid: str
    decision: str


def order_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "product_id": row["product_id"],
        "quantity": row["quantity"],
        "customer": row["customer"],
        "address": row["address"],
        "unit_price_cents": row["unit_price_cents"],
        "total_cents": row["total_cents"],
        "created_at": row["created_at"].isoformat(),
        "status": "confirmed",
    }


def crash_process(step: str) -> None:
    """A failpoint: die at once, as a power cut would, leaving transactions where they are."""
    logger.critical("failpoint %s: crashing on purpose", step)
    logging.shutdown()
    os._exit(70)


class OrderCoordinator:
    def __init__(
        self,
        orders: Engine,
        inventory: Engine,
        *,
        instance_id: str,
        retry_deadline_s: float = 8.0,
        failpoint: str = "",
        on_failpoint: Callable[[str], None] = crash_process,
    ) -> None:
        self.orders = orders
        self.inventory = inventory
        self.instance_id = instance_id
        self.retry_deadline_s = retry_deadline_s
        self.failpoint = failpoint
        self.on_failpoint = on_failpoint

    # -- placing -------------------------------------------------------------------------
    def place(self, request: OrderRequest, idempotency_key: str) -> PlacedOrder:
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_delay(self.retry_deadline_s),
            wait=wait_exponential(multiplier=0.05, max=0.25),  # a failover takes ~1 s: look often
            before_sleep=self._forget_if_lost,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._place_once(request, idempotency_key)
        except psycopg.Error as exc:
            raise self._as_shop_error(exc) from exc
        except Exception as exc:
            if is_transient(exc) or is_busy(exc):
                raise self._as_shop_error(exc) from exc
            raise
        raise AssertionError("unreachable: Retrying either returns or raises")

    def _forget_if_lost(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if exc is not None and is_connection_lost(exc):
            forget_connections(self.orders, self.inventory)

    def _as_shop_error(self, exc: BaseException) -> Exception:
        if is_busy(exc):
            return Busy("the product is locked by another transaction; retry shortly")
        return Unavailable(f"database unavailable: {type(exc).__name__}")

    def _hit(self, step: str) -> None:
        if self.failpoint == step:
            self.on_failpoint(step)

    def _place_once(self, request: OrderRequest, key: str) -> PlacedOrder:
        # No look-up of the key first: a retry of a committed order meets the unique index on
        # the key and is answered from the stored order (or from _refuse if stock ran out).
        fingerprint = request.fingerprint()
        order_id = uuid.uuid4()
        # One transaction id, one prepared gid per participant (gids are unique per cluster).
        txid = f"{GID_PREFIX}{self.instance_id}:{order_id.hex}"
        prepared: list[tuple[Engine, str]] = []
        try:
            with (
                raw_connection(self.inventory) as inv,
                raw_connection(self.orders) as ords,
            ):
                inv.tpc_begin(participant_gid(txid, "inventory"))
                row = inv.execute(TAKE_STOCK, (
                    request.quantity, request.product_id, request.quantity,
                    order_id, -request.quantity,
                )).fetchone()  # fmt: skip
                if row is None:
                    inv.tpc_rollback()
                    return self._refuse(inv, request, key, fingerprint)
                price_cents = int(row[0])
                ords.tpc_begin(participant_gid(txid, "orders"))
                try:
                    cur = ords.cursor(row_factory=dict_row)
                    order = cur.execute(
                        "INSERT INTO orders (id, idempotency_key, request_hash, product_id,"
                        " quantity, customer, address, unit_price_cents, total_cents, gid)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                        f" RETURNING {ORDER_COLUMNS}",
                        (
                            order_id,
                            key,
                            fingerprint,
                            request.product_id,
                            request.quantity,
                            request.customer,
                            request.address,
                            price_cents,
                            price_cents * request.quantity,
                            txid,
                        ),
                    ).fetchone()
                except psycopg.errors.UniqueViolation:
                    # A concurrent twin with the same key committed first: answer as it did.
                    ords.tpc_rollback()
                    inv.tpc_rollback()
                    replay = self._replay(key, fingerprint, request.product_id)
                    if replay is None:
                        raise
                    return replay
                assert order is not None
                placed = PlacedOrder(
                    order_json(order), replayed=False, product_id=request.product_id
                )
                self._hit("before_prepare")
                # Listed before PREPARE: if the connection dies during it, whether it took is
                # unknown, and rolling back a gid that was never prepared is harmless.
                prepared.append((self.inventory, participant_gid(txid, "inventory")))
                inv.tpc_prepare()
                self._hit("after_first_prepare")
                prepared.append((self.orders, participant_gid(txid, "orders")))
                ords.tpc_prepare()
                self._hit("after_both_prepares")
                if not self._record_commit(ords, txid):
                    # A resolver decided abort first (we were too slow): honour it.
                    raise Unavailable("the transaction was aborted by the in-doubt resolver")
                prepared.clear()  # from here on the order is decided: commit, never roll back
                self._hit("after_decision")
                self._commit_decided(inv, txid)
                self._hit("after_first_commit")
                self._commit_decided(ords, txid)
                ords.autocommit = False
        except _DecidedButUnfinished:
            # Acknowledged: the logged decision makes the order durable.
            for engine, part in ((self.inventory, "inventory"), (self.orders, "orders")):
                self._finish_later(engine, participant_gid(txid, part), commit=True)
        except BaseException:
            self._abort_prepared(prepared)
            raise
        return placed

    def _commit_decided(self, conn: psycopg.Connection[Any], gid: str) -> None:
        try:
            conn.tpc_commit()
        except psycopg.Error:
            # The decision is durable: the resolver will finish this commit. The order stands.
            logger.exception("COMMIT PREPARED %s failed; left for the in-doubt resolver", gid)
            raise _DecidedButUnfinished(gid) from None

    def _refuse(
        self, inv: psycopg.Connection[Any], request: OrderRequest, key: str, fingerprint: str
    ) -> PlacedOrder:
        # The guarded UPDATE matched nothing: unknown product, or not enough stock. A twin
        # request with the same key may have taken the last unit: then answer as it did.
        replay = self._replay(key, fingerprint, request.product_id)
        if replay is not None:
            return replay
        exists = inv.execute("SELECT stock FROM products WHERE id = %s", (request.product_id,))
        row = exists.fetchone()
        inv.rollback()
        if row is None:
            raise ProductNotFound(f"product {request.product_id} does not exist")
        raise OutOfStock(
            f"product {request.product_id} has {row[0]} in stock, {request.quantity} requested"
        )

    def _replay(self, key: str, fingerprint: str, product_id: int) -> PlacedOrder | None:
        with raw_connection(self.orders, autocommit=True) as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = cur.execute(
                f"SELECT {ORDER_COLUMNS} FROM orders WHERE idempotency_key = %s", (key,)
            ).fetchone()
        if row is None:
            return None
        if row["request_hash"] != fingerprint:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was already used with a different request body"
            )
        return PlacedOrder(order=order_json(row), replayed=True, product_id=product_id)

    def _record_commit(self, ords: psycopg.Connection[Any], txid: str) -> bool:
        """True when 'commit' is the decision recorded (first writer wins).

        Written on the orders connection itself: once its transaction is prepared the session
        is idle, and in autocommit the decision is one round trip and durable on its own.
        """
        ords.autocommit = True
        won = ords.execute(
            "INSERT INTO tx_decisions (gid, decision, decided_by) VALUES (%s, 'commit', %s)"
            " ON CONFLICT (gid) DO NOTHING RETURNING decision",
            (txid, self.instance_id),
        ).fetchone()
        return won is not None

    def _abort_prepared(self, prepared: list[tuple[Engine, str]]) -> None:
        for engine, gid in prepared:
            try:
                with raw_connection(engine) as conn:
                    conn.tpc_rollback(gid)
            except psycopg.errors.UndefinedObject:
                pass  # never prepared (the connection died first), or already resolved
            except Exception:
                self._finish_later(engine, gid, commit=False)

    def _finish_later(self, engine: Engine, gid: str, *, commit: bool) -> None:
        """Typically the database just failed over: a prepared transaction survives the
        promotion and holds its rows' locks, so every order for that product would wait for
        the in-doubt resolver. This coordinator knows the decision for its own gid, so it
        finishes it itself as soon as a primary answers (the resolver remains the backstop)."""
        threading.Thread(
            target=self._finish, args=(engine, gid, commit), name=f"finish {gid}", daemon=True
        ).start()

    def _finish(self, engine: Engine, gid: str, commit: bool) -> None:
        verb = "commit" if commit else "roll back"
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_delay(self.retry_deadline_s),
            wait=wait_exponential(multiplier=0.05, max=0.25),
            before_sleep=self._forget_if_lost,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt, raw_connection(engine) as conn:
                    if commit:
                        conn.tpc_commit(gid)
                    else:
                        conn.tpc_rollback(gid)
            logger.info("%s of prepared %s done after a retry", verb, gid)
        except psycopg.errors.UndefinedObject:
            pass  # already finished (or never prepared)
        except Exception:
            logger.warning("could not %s prepared %s; the resolver will", verb, gid)

    # -- in-doubt resolution ---------------------------------------------------------------
    def resolve_in_doubt(
        self, *, min_age_s: float, only_own: bool = False, decided_by: str | None = None
    ) -> list[Resolution]:
        """Finish prepared transactions left by a crash: commit if decided so, else abort."""
        pattern = f"{GID_PREFIX}{self.instance_id}:%" if only_own else f"{GID_PREFIX}%"
        resolutions: list[Resolution] = []
        for database, engine in (("inventory", self.inventory), ("orders", self.orders)):
            with raw_connection(engine, autocommit=True) as conn:
                gids = [
                    r[0]
                    for r in conn.execute(
                        "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
                        " AND gid LIKE %s AND prepared <= now() - make_interval(secs => %s)"
                        " ORDER BY prepared",
                        (pattern, min_age_s),
                    )
                ]
            for gid in gids:
                txid = gid.rsplit(":", 1)[0]
                decision = self._decision_or_abort(txid, decided_by or self.instance_id)
                with raw_connection(engine) as conn:
                    try:
                        if decision == "commit":
                            conn.tpc_commit(gid)
                        else:
                            conn.tpc_rollback(gid)
                    except psycopg.errors.UndefinedObject:
                        continue  # another resolver finished it first
                logger.warning("in-doubt %s on %s resolved: %s", gid, database, decision)
                resolutions.append(Resolution(database, gid, decision))
        return resolutions

    def _decision_or_abort(self, txid: str, decided_by: str) -> str:
        with raw_connection(self.orders, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO tx_decisions (gid, decision, decided_by) VALUES (%s, 'abort', %s)"
                " ON CONFLICT (gid) DO NOTHING",
                (txid, decided_by),
            )
            row = conn.execute("SELECT decision FROM tx_decisions WHERE gid = %s", (txid,))
            found = row.fetchone()
        assert found is not None, "a decision row exists after the insert"
        return str(found[0])

    def count_in_doubt(self, *, min_age_s: float) -> int:
        total = 0
        for engine in (self.inventory, self.orders):
            with raw_connection(engine, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
                    " AND gid LIKE %s AND prepared <= now() - make_interval(secs => %s)",
                    (f"{GID_PREFIX}%", min_age_s),
                ).fetchone()
            total += int(row[0]) if row else 0
        return total


def participant_gid(txid: str, database: str) -> str:
    return f"{txid}:{database}"


class _DecidedButUnfinished(Exception):
    """COMMIT PREPARED failed after the commit decision was logged."""

    def __init__(self, gid: str) -> None:
        super().__init__(gid)
        self.gid = gid
