"""InDoubt: finish the shop's two-phase commits left prepared by a crash or a failover.

The shop's protocol, resolved by the one implementation the shop uses too (`twophase`; the
control plane never imports the shop): each prepared transaction `<txid>:<database>` is
committed if the decision log (`tx_decisions` in the orders database) says commit; otherwise
'abort' is recorded first (the first decision written wins, so a slow coordinator cannot
commit it later) and it is rolled back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
import psycopg.errors
from pydantic import BaseModel, ConfigDict, Field

import twophase
from remediation.base import Action, ActionContext, ActionError, Check, Outcome, parse_params


class InDoubtParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    orders_dsn: str  # libpq DSNs; multi-host with target_session_attrs=read-write after failover
    inventory_dsn: str
    # Younger ones may belong to a coordinator still at work: leave them alone.
    min_age_s: float = Field(default=10.0, ge=0)
    gid_prefix: str = "shop:"
    connect_timeout_s: int = 3


class InDoubt(Action):
    kind = "in_doubt"
    # The decision log decides (the first decision written wins): resolving again is harmless.
    may_start_over = True
    Params = InDoubtParams

    @staticmethod
    def _params(ctx: ActionContext) -> InDoubtParams:
        return parse_params(InDoubtParams, ctx, "in_doubt")

    def _connect(self, dsn: str, p: InDoubtParams) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(dsn, connect_timeout=p.connect_timeout_s, autocommit=True)
        except psycopg.OperationalError as exc:
            raise ActionError(f"cannot reach the database: {exc}") from exc

    def _in_doubt(self, p: InDoubtParams) -> dict[str, list[str]]:
        found = {}
        for name, dsn in (("inventory", p.inventory_dsn), ("orders", p.orders_dsn)):
            with self._connect(dsn, p) as conn:
                try:
                    found[name] = twophase.in_doubt(conn, p.gid_prefix + "%", p.min_age_s)
                except psycopg.Error as exc:  # lost after connecting: not a crash, a retry
                    raise ActionError(f"lost the {name} database: {exc}") from exc
        return found

    @classmethod
    def plan(cls, target: str, params: Mapping[str, Any]) -> list[str]:
        p = InDoubtParams.model_validate(dict(params))
        return [
            f"list the transactions prepared under {p.gid_prefix!r} for over {p.min_age_s:g} s "
            "in both databases (none: skipped)",
            "commit each one the decision log says was committed",
            "record 'abort' for every other (the first decision written wins) and roll it back",
            "verify nothing is left prepared and the shop's invariants hold",
        ]

    def precheck(self, ctx: ActionContext) -> Check:
        found = self._in_doubt(self._params(ctx))
        total = sum(len(g) for g in found.values())
        if not total:
            return Check.nothing_to_do("no transaction in doubt")
        return Check.go(f"{total} prepared transaction(s) in doubt")

    def execute(self, ctx: ActionContext) -> Outcome:
        p = self._params(ctx)
        decided: dict[str, list[str]] = {"commit": [], "abort": []}
        try:
            with self._connect(p.orders_dsn, p) as log:
                for database, gids in self._in_doubt(p).items():
                    dsn = p.orders_dsn if database == "orders" else p.inventory_dsn
                    with self._connect(dsn, p) as conn:
                        for gid in gids:
                            decision = twophase.resolve(log, conn, gid, "controlplane")
                            if decision is not None:  # else the shop, restarting, finished it
                                decided[decision].append(gid)
        except psycopg.Error as exc:
            # A node lost mid-way (fenced after a partition: the multi-host URL had found an
            # old primary writable on its old timeline). Resolving again is harmless: the
            # decision log decides, so the next attempt finishes on the leader.
            raise ActionError(
                f"lost the database mid-way ({type(exc).__name__}: {exc}); done so far: {decided}"
            ) from exc
        return Outcome(
            f"committed {len(decided['commit'])}, rolled back {len(decided['abort'])}",
            decided,
        )

    def verify(self, ctx: ActionContext) -> Check:
        try:
            left = sum(len(g) for g in self._in_doubt(self._params(ctx)).values())
        except (ActionError, psycopg.Error) as exc:
            return Check(False, f"cannot look: {exc}")
        if left:
            return Check(False, f"{left} still in doubt")
        return ctx.is_healthy()  # and the business invariants hold
