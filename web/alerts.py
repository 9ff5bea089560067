"""POST /api/v1/alerts: Alertmanager's webhook (version 4), bearer-token authenticated."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import mmap
import os
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from cachetools import TTLCache
from flask import Blueprint, Response, current_app, jsonify, request

from controlplane import services
from controlplane.errors import InvalidRequest
from controlplane.sources import AlertStatus
from web.auth import control_plane, require_token
from web.body import json_object, validated
from web.openapi import AlertsAcceptedOut, documented

alerts = Blueprint("alerts", __name__)
logger = logging.getLogger(__name__)


def _refill(
    tokens: float, at: float, now: float, rate_per_s: float, burst: int, alerts: int
) -> tuple[float, float]:
    """(tokens left, seconds to wait): 0 s when `alerts` fit now and were taken."""
    tokens = min(float(burst), tokens + (now - at) * rate_per_s)
    if alerts <= tokens:
        return tokens - alerts, 0.0
    if alerts > burst:
        return tokens, math.inf
    return tokens, (alerts - tokens) / rate_per_s


class IntakeLimit:
    """A token bucket of alerts per source: `per_minute` sustained, `burst` at once. Sources
    are bounded in number (an LRU of buckets), so many sources cannot exhaust memory."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate_per_s = per_minute / 60
        self.burst = burst
        self._buckets: TTLCache[str, tuple[float, float]] = TTLCache(maxsize=4096, ttl=3600)
        self._lock = threading.Lock()

    def take(self, source: str, alerts: int, now: float | None = None) -> float:
        """0 when `alerts` may come in now (and they are counted), else seconds to wait."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.get(source, (float(self.burst), now))
            tokens, wait_s = _refill(tokens, at, now, self.rate_per_s, self.burst, alerts)
            self._buckets[source] = (tokens, now)
            return wait_s


class SharedIntakeLimit:
    """The same buckets for every web worker process: a table in a memory file mapped before
    the workers fork, so that N workers take `burst` and `per_minute` from a source once, not
    N times. A source has a slot by the hash of its address (probing a few on); with every
    probed slot taken by a recent source, it takes over the one idle longest. CLOCK_MONOTONIC
    is one clock for all processes (Linux).

    The table is locked with a POSIX record lock on its file, which the kernel drops when the
    process holding it dies: a worker killed (OOM, SIGKILL, gunicorn's timeout) in the middle
    of a count leaves no lock behind. Within a process, a thread lock goes first (record locks
    belong to the process, not the thread)."""

    SLOTS = 4096
    PROBES = 8
    IDLE_S = 3600.0  # a bucket untouched this long is free
    LOCK_WAIT_S = 1.0
    _row = struct.Struct("<Qdd")  # source hash (0: free), tokens, at

    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate_per_s = per_minute / 60
        self.burst = burst
        size = self.SLOTS * self._row.size
        self._fd = os.memfd_create("shopguard-intake", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, size)
        self._table = mmap.mmap(self._fd, size)  # MAP_SHARED: one table for all the workers
        self._thread_lock = threading.Lock()

    def take(self, source: str, alerts: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        key = int.from_bytes(hashlib.blake2b(source.encode(), digest_size=8).digest()) or 1
        with self._locked():
            slot = self._slot(key, now)
            found, tokens, at = self._row.unpack_from(self._table, slot * self._row.size)
            if found != key:
                tokens, at = float(self.burst), now
            tokens, wait_s = _refill(tokens, at, now, self.rate_per_s, self.burst, alerts)
            self._row.pack_into(self._table, slot * self._row.size, key, tokens, now)
            return wait_s

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # A live worker stopped inside the section (SIGSTOP, a debugger) still holds the
        # record lock: past LOCK_WAIT_S in all, count without it (a race may miscount once;
        # intake never stops).
        deadline = time.monotonic() + self.LOCK_WAIT_S
        threads = self._thread_lock.acquire(timeout=self.LOCK_WAIT_S)
        record = False
        while threads and not record:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                record = True
            except OSError:  # EAGAIN/EACCES: another worker counts
                if time.monotonic() > deadline:
                    break
                time.sleep(0.001)
        if not record:
            logger.warning("the shared intake lock is held too long: counting without it")
        try:
            yield
        finally:
            if record:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
            if threads:
                self._thread_lock.release()

    def _slot(self, key: int, now: float) -> int:
        oldest, oldest_at = key % self.SLOTS, math.inf
        for probe in range(self.PROBES):
            slot = (key + probe) % self.SLOTS
            found, _, at = self._row.unpack_from(self._table, slot * self._row.size)
            if found == key or found == 0 or now - at > self.IDLE_S:
                return slot
            if at < oldest_at:
                oldest, oldest_at = slot, at
        return oldest


# Per control plane (weakly: one gone takes its buckets along; an id() could be reused).
_limits: weakref.WeakKeyDictionary[services.ControlPlane, IntakeLimit] = weakref.WeakKeyDictionary()
_limits_lock = threading.Lock()


SHARED_INTAKE = "SHOPGUARD_SHARED_INTAKE"  # app.config: a SharedIntakeLimit, set by web.server


def intake_limit(cp: services.ControlPlane) -> IntakeLimit | SharedIntakeLimit:
    shared: SharedIntakeLimit | None = current_app.config.get(SHARED_INTAKE)
    if shared is not None:
        return shared
    with _limits_lock:
        found = _limits.get(cp)
        if found is None:
            found = _limits[cp] = IntakeLimit(
                cp.settings.intake_alerts_per_minute, cp.settings.intake_alerts_burst
            )
        return found


@alerts.post("/alerts")
@documented(200, AlertsAcceptedOut, body=services.WebhookIn, errors=(400, 401, 429),
            auth="webhook")  # fmt: skip
def receive() -> tuple[Response, int] | tuple[Response, int, dict[str, str]]:
    """Alertmanager's webhook (v4), with the webhook token"""
    cp = control_plane()
    require_token(cp.settings.webhook_token, "webhook")
    body = json_object("a JSON object (Alertmanager webhook v4)")
    payload = validated(services.WebhookIn, body)
    # Firing alerts are what costs (incidents, decisions, actions); a resolution only closes.
    firing = sum(a.status == AlertStatus.FIRING for a in payload.alerts)
    wait_s = intake_limit(cp).take(request.remote_addr or "?", firing) if firing else 0.0
    if wait_s:
        cp.metrics.alerts_received.labels("refused").inc(len(payload.alerts))
        if math.isinf(wait_s):
            raise InvalidRequest(
                f"{firing} firing alerts in one post: more than the intake's burst "
                f"({cp.settings.intake_alerts_burst})"
            )
        retry = str(max(1, math.ceil(wait_s)))
        message = f"too many alerts from this source: retry in {retry}s"
        return jsonify(error=message), 429, {"Retry-After": retry}
    return jsonify(services.receive_alerts(cp, payload)), 200
