"""PostgresProbe: reachable, role, replication and synchronous state, lag, in-doubt
prepared transactions, and commits waiting on synchronous replication."""

from __future__ import annotations

from typing import Any, Literal

import psycopg
from pydantic import Field

from pgcluster.nodes import session
from probes.base import Health, Params, Probe, ProbeResult, describe, down


class PostgresParams(Params):
    dsn: str
    expect_role: Literal["primary", "standby"] | None = None
    expect_sync_standby: bool = False
    max_lag_bytes: int = Field(default=16 * 1024 * 1024, ge=0)
    max_prepared_age_s: float = Field(default=30.0, ge=0)


QUERIES = {
    "standbys": (
        "SELECT application_name, state, sync_state,"
        " coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint"
        " FROM pg_stat_replication"
    ),
    "prepared": (
        "SELECT count(*), coalesce(extract(epoch FROM max(now() - prepared)), 0)"
        " FROM pg_prepared_xacts"
    ),
    "syncrep_waiters": "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
}


class PostgresProbe(Probe):
    kind = "postgres"
    Params = PostgresParams

    def check(self) -> ProbeResult:
        p: PostgresParams = self.params  # type: ignore[assignment]
        try:
            with session(p.dsn, self.timeout_s) as conn:
                details = self._observe(conn)
        except psycopg.Error as exc:
            return down(describe(exc))
        return self._judge(p, details)

    def _observe(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        in_recovery = bool(row and row[0])
        details: dict[str, Any] = {"role": "standby" if in_recovery else "primary"}
        count, oldest_s = conn.execute(QUERIES["prepared"]).fetchone() or (0, 0)
        details["prepared_xacts"] = int(count)
        details["oldest_prepared_s"] = round(float(oldest_s), 1)
        if in_recovery:
            row = conn.execute(
                "SELECT status, coalesce(pg_wal_lsn_diff(latest_end_lsn,"
                " pg_last_wal_replay_lsn()), 0)::bigint FROM pg_stat_wal_receiver"
            ).fetchone()
            details["receiving"] = row[0] if row else None
            details["replay_lag_bytes"] = int(row[1]) if row else None
            return details
        details["standbys"] = [
            {"name": r[0], "state": r[1], "sync_state": r[2], "lag_bytes": int(r[3])}
            for r in conn.execute(QUERIES["standbys"])
        ]
        sync_names = conn.execute("SHOW synchronous_standby_names").fetchone()
        details["synchronous_standby_names"] = sync_names[0] if sync_names else ""
        waiters = conn.execute(QUERIES["syncrep_waiters"]).fetchone()
        details["commits_waiting_on_sync"] = int(waiters[0]) if waiters else 0
        return details

    def _judge(self, p: PostgresParams, d: dict[str, Any]) -> ProbeResult:
        if p.expect_role and d["role"] != p.expect_role:
            return ProbeResult(Health.DOWN, f"is {d['role']}, expected {p.expect_role}", details=d)
        problems = []
        if d["prepared_xacts"] and d["oldest_prepared_s"] > p.max_prepared_age_s:
            problems.append(f"{d['prepared_xacts']} prepared, oldest {d['oldest_prepared_s']}s")
        if d["role"] == "primary":
            streaming = [s for s in d["standbys"] if s["state"] == "streaming"]
            if p.expect_sync_standby and not any(s["sync_state"] == "sync" for s in streaming):
                problems.append("no synchronous standby")
            if any(s["lag_bytes"] > p.max_lag_bytes for s in streaming):
                problems.append("a standby lags")
            if d["commits_waiting_on_sync"]:
                problems.append(f"{d['commits_waiting_on_sync']} commits wait on sync rep")
        elif d.get("receiving") != "streaming":
            problems.append("not streaming from a primary")
        if problems:
            return ProbeResult(Health.DEGRADED, "; ".join(problems), details=d)
        return ProbeResult(Health.UP, f"{d['role']}, healthy", details=d)
