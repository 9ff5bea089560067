"""The shop's Prometheus metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

logger = logging.getLogger(__name__)

REQUEST_SECONDS = Histogram(
    "shop_request_duration_seconds",
    "HTTP request latency by route",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ORDERS = Counter("shop_orders_total", "Order requests by result", ["result"])
DB_ERRORS = Counter("shop_db_errors_total", "Database errors by kind", ["kind"])


class InDoubtCollector(Collector):
    """Counts prepared (in-doubt) shop transactions at scrape time; absent if the DB is down."""

    def __init__(self, count: Callable[[], int], min_age_s: float) -> None:
        self.count = count
        self.min_age_s = min_age_s

    def collect(self) -> Iterator[Metric]:
        try:
            value = self.count()
        except Exception as exc:  # a scrape must never fail because a database is down
            logger.debug("in-doubt count unavailable: %s", exc)
            DB_ERRORS.labels("scrape").inc()
            return
        gauge = GaugeMetricFamily(
            "shop_in_doubt_transactions",
            f"Prepared shop transactions older than {self.min_age_s:g}s",
        )
        gauge.add_metric([], value)
        yield gauge


_registered: list[Collector] = []


def register_in_doubt(collector: InDoubtCollector) -> None:
    """One in-doubt collector per process: a second app (as in tests) replaces the first."""
    for old in _registered:
        REGISTRY.unregister(old)
    _registered[:] = [collector]
    REGISTRY.register(collector)
