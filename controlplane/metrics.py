"""The control plane's own Prometheus metrics, in a registry of its own (one per instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.probe_seconds = Histogram(
            "cp_probe_duration_seconds",
            "Probe run time by probe and health",
            ["probe", "health"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.probe_up = Gauge(
            "cp_probe_up",
            "1 if the probe's last result was UP, else 0",
            ["probe", "service"],
            registry=r,
        )
        self.incidents_open = Gauge("cp_incidents_open", "Open incidents", registry=r)
        self.incidents = Counter(
            "cp_incidents_total", "Incident state changes", ["event"], registry=r
        )
        self.actions = Counter(
            "cp_actions_total",
            "Finished action runs by action and result",
            ["action", "result"],
            registry=r,
        )
        self.actions_in_progress = Gauge(
            "cp_actions_in_progress", "Action runs executing now", registry=r
        )
        self.alerts_received = Counter(
            "cp_alerts_received_total",
            "Alerts received from Alertmanager, by status (refused: over the intake limit)",
            ["status"],
            registry=r,
        )
        self.scheduler_lag = Gauge(
            "cp_scheduler_lag_seconds",
            "Delay of the last probe job behind its schedule",
            registry=r,
        )
        self.cycle_seconds = Histogram(
            "cp_cycle_duration_seconds",
            "Time of one decision cycle",
            registry=r,
            # Beyond a second, so that a slow cycle's p99 is a figure, not "above the top".
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30),
        )
        self.is_leader = Gauge(
            "cp_leader", "1 while this control plane holds the lease", registry=r
        )
        self.escalations = Counter(
            "cp_escalations_total",
            "Incidents escalated to a human: healing held, unsafe, or not done in time",
            registry=r,
        )
        self.notifications = Counter(
            "cp_notifications_total",
            "Notifications by channel and result",
            ["channel", "result"],
            registry=r,
        )
