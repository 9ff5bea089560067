"""Fault kinds: kind → dotted path, imported lazily (as the probes' and actions' registries)."""

from __future__ import annotations

import importlib

from lab.chaos.base import ChaosError, Fault

FAULTS: dict[str, str] = {
    "kill-primary": "lab.chaos.kill_primary.KillPrimary",
    "hang-primary": "lab.chaos.hang_primary.HangPrimary",
    "kill-standby": "lab.chaos.kill_standby.KillStandby",
    "hang-standby": "lab.chaos.hang_standby.HangStandby",
    "starve-cpu": "lab.chaos.starve_cpu.StarveCpu",
    "kill-shop": "lab.chaos.kill_shop.KillShop",
    "kill-redis": "lab.chaos.kill_redis.KillRedis",
    "hang-redis": "lab.chaos.hang_redis.HangRedis",
    "poison-cache": "lab.chaos.poison_cache.PoisonCache",
    "delete-orders": "lab.chaos.delete_orders.DeleteOrders",
    "drop-table": "lab.chaos.drop_table.DropTable",
    "crash-in-doubt": "lab.chaos.crash_in_doubt.CrashInDoubt",
    "stop-prometheus": "lab.chaos.stop_monitoring.StopPrometheus",
    "stop-alertmanager": "lab.chaos.stop_monitoring.StopAlertmanager",
    "kill-controlplane": "lab.chaos.kill_controlplane.KillControlplane",
    "fill-archive": "lab.chaos.fill_archive.FillArchive",
}


def fault(kind: str) -> Fault:
    try:
        path = FAULTS[kind]
    except KeyError:
        raise ChaosError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}") from None
    module, _, name = path.rpartition(".")
    made: Fault = getattr(importlib.import_module(module), name)()
    return made
