"""Reads every viewer shares, computed once per web worker per half second: fifty open pages
polling the overview (or health checkers on the API) cost one computation, not fifty. Half a
second is far inside the dashboard's 2 s from a change to the page."""

from __future__ import annotations

import threading
from typing import Any

from cachetools import TTLCache, cached

from controlplane import services

SHARED_FOR_S = 0.5


# Keyed by the control plane itself (held for the TTL), not by id(): a new one may reuse the
# id of one gone, and must not be answered with its figures.
@cached(TTLCache(maxsize=8, ttl=SHARED_FOR_S), key=lambda cp: cp, lock=threading.Lock())
def overview(cp: services.ControlPlane) -> dict[str, Any]:
    return services.views.overview(cp)


@cached(TTLCache(maxsize=8, ttl=SHARED_FOR_S), key=lambda cp: cp, lock=threading.Lock())
def health(cp: services.ControlPlane) -> dict[str, Any]:
    return services.health_summary(cp)
