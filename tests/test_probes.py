"""Probes: the contract every registered kind keeps, and each kind against a real server."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, delete, insert, text

from lab.layout import find_free_base_port
from lab.stack import Stack
from probes.base import Health, ProbeConfigError, ProbeResult
from probes.registry import PROBES, build_probe
from shop.models import Order


def params_for(kind: str, port: int) -> dict[str, Any]:
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    return {
        "http": {"url": f"http://127.0.0.1:{port}/readyz"},
        "tcp": {"port": port},
        "postgres": {"dsn": dsn},
        "pg_primary": {"nodes": {"pg0": dsn}},
        "pg_standby": {"nodes": {"pg0": dsn, "pg1": dsn}},
        "pg_archive": {"dsn": dsn},
        "redis": {"url": f"redis://127.0.0.1:{port}/0"},
        "prometheus": {"url": f"http://127.0.0.1:{port}", "query": "up"},
        "invariant": {"orders_dsn": dsn, "inventory_dsn": dsn},
        "backup": {"database_url": f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"},
        "cache_truth": {"redis_url": f"redis://127.0.0.1:{port}/0", "inventory_dsn": dsn},
    }[kind]


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port that accepts TCP connections (in the backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("kind", sorted(PROBES))
def test_every_kind_reports_a_refused_connection_as_down(kind: str) -> None:
    probe = build_probe(kind, f"dead-{kind}", params_for(kind, find_free_base_port()), 1.0)
    result = probe.run()
    assert isinstance(result, ProbeResult)
    # DOWN, or UNKNOWN for a kind that judges data behind the target (`invariant`).
    assert result.health is probe.unreachable
    assert probe.unreachable in (Health.DOWN, Health.UNKNOWN)
    assert result.summary
    assert result.latency_ms >= 0


@pytest.mark.parametrize("kind", sorted(PROBES))
def test_every_kind_honours_its_timeout_against_a_silent_server(kind: str, blackhole: int) -> None:
    probe = build_probe(kind, f"silent-{kind}", params_for(kind, blackhole), 0.5)
    started = time.monotonic()
    result = probe.run()
    elapsed_s = time.monotonic() - started
    assert elapsed_s < 5, f"{kind} took {elapsed_s:.1f}s with a 0.5s timeout"
    expected = Health.UP if kind == "tcp" else probe.unreachable  # tcp only asks: does it accept?
    assert result.health is expected


@pytest.mark.parametrize("kind", sorted(PROBES))
def test_every_kind_refuses_unknown_params_naming_them(kind: str) -> None:
    params = {**params_for(kind, 1), "colour": "blue"}
    with pytest.raises(ProbeConfigError, match=r"params\.colour"):
        build_probe(kind, "bad", params, 1.0)


def test_an_unknown_kind_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ProbeConfigError, match=r"known: backup, cache_truth, http"):
        build_probe("telepathy", "x", {}, 1.0)


def test_http_is_up_on_a_ready_shop_and_down_on_a_wrong_status(shops: list[str]) -> None:
    ready = build_probe("http", "ready", {"url": f"{shops[0]}/readyz"}, 2).run()
    missing = build_probe("http", "missing", {"url": f"{shops[0]}/nowhere"}, 2).run()
    assert ready.health is Health.UP
    assert (missing.health, missing.summary) == (Health.DOWN, "HTTP 404, expected 200")


def test_postgres_sees_the_primary_with_its_synchronous_standby(stack: Stack) -> None:
    dsn = stack.dsn("pg0")
    params = {"dsn": dsn, "expect_role": "primary", "expect_sync_standby": True}
    result = build_probe("postgres", "primary", params, 2).run()
    assert result.health is Health.UP, result.summary
    assert result.details["role"] == "primary"
    assert [s["sync_state"] for s in result.details["standbys"]] == ["sync"]


def test_postgres_reports_a_standby_where_a_primary_was_expected(stack: Stack) -> None:
    dsn = stack.dsn("pg1")
    as_standby = build_probe("postgres", "s", {"dsn": dsn, "expect_role": "standby"}, 2).run()
    as_primary = build_probe("postgres", "p", {"dsn": dsn, "expect_role": "primary"}, 2).run()
    assert as_standby.health is Health.UP
    assert as_standby.details["receiving"] == "streaming"
    assert as_primary.health is Health.DOWN
    assert "expected primary" in as_primary.summary


def test_redis_answers_with_memory_and_hit_ratio(stack: Stack) -> None:
    url = stack.describe()["shop"]["redis_url"]
    result = build_probe("redis", "cache", {"url": url}, 2).run()
    assert result.health is Health.UP
    assert result.details["used_memory_bytes"] > 0


def test_cache_truth_names_the_cached_products_the_database_denies(
    stack: Stack, engines: dict[str, Engine], new_product: Callable[..., int]
) -> None:
    import json

    import redis

    from lab.targets import primary_dsn

    url = stack.describe()["shop"]["redis_url"]
    prefix = f"t{uuid.uuid4().hex}:"  # keys of its own: the shop's are the control plane's
    params = {"redis_url": url, "inventory_dsn": primary_dsn(stack.layout, "inventory"),
              "key_prefix": prefix}  # fmt: skip
    client = redis.Redis.from_url(url)
    try:
        assert build_probe("cache_truth", "t", params, 2).run().summary == "nothing cached"
        right, wrong = new_product(stock=1, price_cents=250), new_product(stock=1, price_cents=250)
        with engines["inventory"].connect() as conn:
            rows = conn.execute(
                text("SELECT id, sku, name, price_cents FROM products WHERE id IN (:a, :b)"),
                {"a": right, "b": wrong},
            ).all()
        for product_id, sku, name, price in rows:
            value = {"id": product_id, "sku": sku, "name": name, "price_cents": price}
            if product_id == wrong:
                value["price_cents"] = 1  # what a stray script wrote
            client.set(prefix + str(product_id), json.dumps(value), ex=60)
        result = build_probe("cache_truth", "t", params, 2).run()
        assert result.health is Health.DOWN, result
        assert result.details["wrong_ids"] == [wrong]
        assert result.details["sampled"] == 2
        client.delete(prefix + str(wrong))
        assert build_probe("cache_truth", "t", params, 2).run().health is Health.UP
        client.set(prefix + "not-an-id", b"\xff", ex=60)
        garbled = build_probe("cache_truth", "t", params, 2).run()
        assert garbled.health is Health.DOWN and garbled.details["garbled"] == 1, garbled
    finally:
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()


def test_prometheus_compares_every_series_with_the_threshold(
    stack: Stack, shops: list[str]
) -> None:
    from lab.process import wait_until

    url = stack.describe()["components"]["prometheus"]["url"]
    all_up = {"url": url, "query": 'up{job="shop"}', "op": "<", "threshold": 1}
    wait_until(
        lambda: build_probe("prometheus", "up", all_up, 2).run().details["series"] == len(shops),
        timeout_s=20, what="both shops scraped",
    )  # fmt: skip
    healthy = build_probe("prometheus", "up", all_up, 2).run()
    breaching = build_probe(
        "prometheus", "any", {"url": url, "query": 'up{job="shop"}', "op": ">", "threshold": 0}, 2
    ).run()
    assert healthy.health is Health.UP
    assert breaching.health is Health.DOWN
    assert len(breaching.details["breaching"]) == len(shops)


def test_invariant_finds_an_order_without_its_inventory_movement(
    stack: Stack, engines: dict[str, Engine], new_product: Callable[..., int]
) -> None:
    def dsn(db: str) -> str:
        return stack.dsn("pg0", db)

    params = {"orders_dsn": dsn("orders"), "inventory_dsn": dsn("inventory"), "settle_s": 0}
    assert build_probe("invariant", "inv", params, 5).run().health is Health.UP
    orphan = uuid.uuid4()
    with engines["orders"].begin() as conn:
        conn.execute(
            insert(Order).values(
                id=orphan, idempotency_key=f"orphan-{orphan}", request_hash="x",
                product_id=new_product(stock=1), quantity=1, customer="c", address="a",
                unit_price_cents=1, total_cents=1, gid="none",
                created_at=text("now() - interval '1 minute'"),
            )
        )  # fmt: skip
    try:
        broken = build_probe("invariant", "inv", params, 5).run()
        assert broken.health is Health.DOWN
        assert str(orphan) in broken.details["orders_without_movement"]
    finally:
        with engines["orders"].begin() as conn:
            conn.execute(delete(Order).where(Order.id == orphan))


def test_backup_is_down_without_a_verified_backup_and_up_with_a_fresh_one(
    tmp_path: Path,
) -> None:
    from datetime import UTC, datetime, timedelta

    from controlplane import store
    from controlplane.models import Backup

    url = f"sqlite:///{tmp_path / 'state.db'}"
    engine = store.make_engine(url)
    store.migrate(engine)
    params = {"database_url": url, "max_age_s": 3600}
    assert build_probe("backup", "b", params, 2).run().summary == "no verified backup"
    now = datetime.now(UTC)
    with store.transaction(store.session_factory(engine)) as s:
        s.add(
            Backup(
                label="old",
                path="/x",
                started_at=now - timedelta(hours=3),
                verified_at=now - timedelta(hours=2),
            )
        )
    stale = build_probe("backup", "b", params, 2).run()
    assert stale.health is Health.DOWN and "2.0 h old" in stale.summary
    with store.transaction(store.session_factory(engine)) as s:
        s.add(Backup(label="new", path="/y", started_at=now, verified_at=now))
        s.add(Backup(label="unverified", path="/z", started_at=now, verified_at=None))
    fresh = build_probe("backup", "b", params, 2).run()
    assert fresh.health is Health.UP
    assert fresh.details["verified_backups"] == 2
    engine.dispose()


@pytest.mark.parametrize(
    ("archived", "current", "behind"),
    [
        ("000000010000000000000003", "000000010000000000000004", 0),
        ("000000010000000000000003", "00000002000000000000000A", 6),  # across a promotion
        ("0000000100000000000000FF", "000000010000000100000002", 2),  # the log's next file
        ("00000002.history", "000000020000000000000004", None),
        (None, "000000010000000000000004", None),
    ],
)
def test_pg_archive_counts_the_segments_written_but_not_archived(
    archived: str | None, current: str, behind: int | None
) -> None:
    from probes.pg_archive import segments_behind

    assert segments_behind(archived, current, 16 * 1024 * 1024) == behind


def test_pg_archive_is_down_naming_the_failing_segment_while_archive_command_fails(
    stack: Stack,
) -> None:
    import psycopg

    from lab.process import wait_until
    from lab.targets import primary_dsn

    leader = primary_dsn(stack.layout, "postgres")
    probe = build_probe("pg_archive", "archive", {"dsn": leader}, 2)
    with psycopg.connect(leader, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT inet_server_port()").fetchone()
        standby = "pg1" if row == (stack.layout.pg_port(0),) else "pg0"
        try:
            conn.execute("ALTER SYSTEM SET archive_command = 'false'")
            conn.execute("SELECT pg_reload_conf()")
            # Some WAL, then a switch: a full segment the archiver must try (and fail) at once.
            conn.execute("SELECT pg_logical_emit_message(false, 'test', 'to archive')")
            conn.execute("SELECT pg_switch_wal()")
            wait_until(
                lambda: probe.run().health is Health.DOWN, timeout_s=30, what="archiving failing"
            )
            failing = probe.run()
            assert failing.summary.startswith("WAL archiving fails: segment "), failing
            assert failing.details["last_failed_wal"] in failing.summary
        finally:
            conn.execute("ALTER SYSTEM RESET archive_command")
            conn.execute("SELECT pg_reload_conf()")  # wakes the archiver: it tries again
        wait_until(lambda: probe.run().health is Health.UP, timeout_s=30, what="archiving again")
    on_standby = build_probe("pg_archive", "s", {"dsn": stack.dsn(standby)}, 2).run()
    assert on_standby.health is Health.UNKNOWN, on_standby
