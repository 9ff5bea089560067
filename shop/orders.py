"""Placing an order: one two-phase commit over `inventory` and `orders`, with a decision log.

The protocol (presumed abort), for transaction id `txid` = shop:<instance>:<order id>, in four
round trips (each numbered step is one, its statements sent together as one simple query):
  1. inventory: BEGIN; guarded UPDATE of stock + INSERT movement (one statement);
                PREPARE TRANSACTION '<txid>:inventory'
  2. orders:    BEGIN; INSERT order (unique idempotency key); PREPARE TRANSACTION '<txid>:orders';
                INSERT INTO tx_decisions (txid, 'commit') ON CONFLICT DO NOTHING  <- the decision
                (in a transaction of its own, run only if everything before it succeeded)
  3. COMMIT PREPARED on inventory, then 4. on orders
A crash before the decision is written leaves none: the resolver records 'abort' (first writer
wins) and rolls both back. A crash after it leaves 'commit': the resolver commits what is still
prepared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
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

import twophase
from shop.db import forget_connections, is_busy, is_connection_lost, is_transient, raw_connection
from shop.errors import Busy, IdempotencyKeyReused, OutOfStock, ProductNotFound, Unavailable
from shop.sqlbatch import Literals, commit_prepared, load_value, results_of, run_batch

logger = logging.getLogger(__name__)

GID_PREFIX = "shop:"

# The statements of an order, bound on the client (ints with %d, everything else a literal
# escaped by libpq) and sent as one simple query per participant: one round trip each. An error
# stops the rest of its query string, so nothing after a failed statement runs.
# 1. inventory: the guarded decrement and its movement row in one statement, then PREPARE.
PREPARE_STOCK = (
    b"BEGIN;"
    b" WITH taken AS (UPDATE products SET stock = stock - %d, updated_at = now()"
    b" WHERE id = %d AND stock >= %d RETURNING id, price_cents)"
    b" INSERT INTO stock_movements (order_id, product_id, delta)"
    b" SELECT %s, id, %d FROM taken RETURNING (SELECT price_cents FROM taken);"
    b" PREPARE TRANSACTION %s"
)
# 2. orders: the order, its PREPARE, and after it (in a transaction of its own) the decision,
# which runs only if everything before it succeeded. Inventory's PREPARE was answered before
# this is sent, so both participants are prepared when the decision is written.
PREPARE_ORDER_ONLY = (
    b"BEGIN;"
    b" INSERT INTO orders (id, idempotency_key, request_hash, product_id, quantity, customer,"
    b" address, unit_price_cents, total_cents, gid)"
    b" VALUES (%s, %s, %s, %d, %d, %s, %s, %d, %d, %s) RETURNING created_at;"
    b" PREPARE TRANSACTION %s"
)
# The decision: first writer wins (a resolver may have written 'abort' already).
RECORD_COMMIT = (
    b"INSERT INTO tx_decisions (gid, decision, decided_by) VALUES (%s, 'commit', %s)"
    b" ON CONFLICT (gid) DO NOTHING RETURNING decision"
)
PREPARE_ORDER = PREPARE_ORDER_ONLY + b"; " + RECORD_COMMIT

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
        started = time.monotonic()
        try:
            try:  # the first attempt without tenacity's bookkeeping: most orders need no other
                return self._place_once(request, idempotency_key)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if is_connection_lost(exc):
                    forget_connections(self.orders, self.inventory)
            # Transient (a failover, a restart): retry with back-off until the deadline.
            retrying = Retrying(
                retry=retry_if_exception(is_transient),
                stop=stop_after_delay(
                    max(0.0, self.retry_deadline_s - (time.monotonic() - started))
                ),
                wait=wait_exponential(multiplier=0.05, max=0.1),  # a failover takes ~0.3 s
                before_sleep=self._forget_if_lost,
                reraise=True,
            )
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
        inv_gid, ord_gid = (
            twophase.participant_gid(txid, "inventory"),
            twophase.participant_gid(txid, "orders"),
        )
        # Listed before the PREPARE is sent: if the connection dies meanwhile, whether it took
        # is unknown, and rolling back a gid that was never prepared is harmless.
        prepared: list[tuple[Engine, str]] = []
        # Three waits (see PREPARE_STOCK and PREPARE_ORDER, then both COMMIT PREPAREDs
        # overlapped): each participant's work travels with its PREPARE, the decision with
        # the last PREPARE.
        try:
            # Not in autocommit: run_batch sends its own BEGIN, past psycopg's transaction
            # handling (so no switching back and forth), while the rare paths that use
            # psycopg itself (_refuse, a rollback) get its usual transactions.
            with (
                raw_connection(self.inventory) as inv,
                raw_connection(self.orders) as ords,
            ):
                lit_inv, lit = Literals(inv), Literals(ords)
                self._hit("before_prepare")
                prepared.append((self.inventory, inv_gid))
                taken = run_batch(inv, PREPARE_STOCK % (
                    request.quantity, request.product_id, request.quantity,
                    Literals.uuid(order_id), -request.quantity, lit_inv.text(inv_gid),
                ))[1]  # fmt: skip
                if taken.ntuples == 0:
                    prepared.clear()
                    run_batch(inv, b"ROLLBACK PREPARED %s" % lit_inv.text(inv_gid))
                    return self._refuse(inv, request, key, fingerprint)
                price_cents = int(taken.get_value(0, 0) or b"")
                self._hit("after_first_prepare")
                split = self.failpoint == "after_both_prepares"
                decision = b"" if split else b"; " + RECORD_COMMIT % (
                    lit.text(txid), lit.text(self.instance_id),
                )  # fmt: skip
                prepared.append((self.orders, ord_gid))
                try:
                    results = run_batch(ords, PREPARE_ORDER_ONLY % (
                        Literals.uuid(order_id), lit.text(key), lit.text(fingerprint),
                        request.product_id, request.quantity, lit.text(request.customer),
                        lit.text(request.address), price_cents, price_cents * request.quantity,
                        lit.text(txid), lit.text(ord_gid),
                    ) + decision)  # fmt: skip
                except psycopg.errors.UniqueViolation:
                    # A concurrent twin with the same key committed first: answer as it did.
                    # (The error stopped the batch before its PREPARE: only inventory's is.)
                    ords.rollback()
                    prepared.pop()
                    run_batch(inv, b"ROLLBACK PREPARED %s" % lit_inv.text(inv_gid))
                    prepared.clear()
                    replay = self._replay(key, fingerprint, request.product_id)
                    if replay is None:
                        raise
                    return replay
                placed = PlacedOrder(
                    order_json({
                        "id": order_id, "product_id": request.product_id,
                        "quantity": request.quantity, "customer": request.customer,
                        "address": request.address, "unit_price_cents": price_cents,
                        "total_cents": price_cents * request.quantity,
                        "created_at": load_value(ords, results[1]),
                    }),
                    replayed=False,
                    product_id=request.product_id,
                )  # fmt: skip
                if split:
                    self._hit("after_both_prepares")
                    results = run_batch(
                        ords, RECORD_COMMIT % (lit.text(txid), lit.text(self.instance_id))
                    )
                if results[-1].ntuples == 0:
                    # A resolver decided abort first (we were too slow): honour it.
                    raise Unavailable("the transaction was aborted by the in-doubt resolver")
                prepared.clear()  # from here on the order is decided: commit, never roll back
                self._hit("after_decision")
                self._commit_decided(inv, ords, inv_gid, ord_gid)
        except _DecidedButUnfinished:
            # Acknowledged: the logged decision makes the order durable.
            for engine, gid in ((self.inventory, inv_gid), (self.orders, ord_gid)):
                self._finish_later(engine, gid, commit=True)
        except BaseException:
            self._abort_prepared(prepared)
            raise
        return placed

    def _commit_decided(
        self,
        inv: psycopg.Connection[Any],
        ords: psycopg.Connection[Any],
        inv_gid: str,
        ord_gid: str,
    ) -> None:
        """COMMIT PREPARED on both, overlapped: inventory's is sent without waiting, orders'
        is sent and awaited, then inventory's answer is read, by then almost always arrived
        (one wait instead of two; each commit waits for an fsync and the standby)."""
        try:
            if self.failpoint == "after_first_commit":  # one after the other, to stop between
                run_batch(inv, commit_prepared(inv_gid))
                self._hit("after_first_commit")
                run_batch(ords, commit_prepared(ord_gid))
                return
            inv.pgconn.send_query(commit_prepared(inv_gid))
            inv.pgconn.flush()
            run_batch(ords, commit_prepared(ord_gid))
            results_of(inv)
        except psycopg.Error:
            # The decision is durable: the resolver will finish this commit. The order stands.
            logger.exception("COMMIT PREPARED %s failed; left for the in-doubt resolver", ord_gid)
            raise _DecidedButUnfinished(ord_gid) from None

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
                gids = twophase.in_doubt(conn, pattern, min_age_s)
            for gid in gids:
                with (
                    raw_connection(self.orders, autocommit=True) as log,
                    raw_connection(engine) as conn,
                ):
                    decision = twophase.resolve(log, conn, gid, decided_by or self.instance_id)
                if decision is None:
                    continue  # another resolver finished it first
                logger.warning("in-doubt %s on %s resolved: %s", gid, database, decision)
                resolutions.append(Resolution(database, gid, decision))
        return resolutions

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


class _DecidedButUnfinished(Exception):
    """COMMIT PREPARED failed after the commit decision was logged."""

    def __init__(self, gid: str) -> None:
        super().__init__(gid)
        self.gid = gid
