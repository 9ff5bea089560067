"""Action kinds by name, imported only when used."""

from __future__ import annotations

import kinds
from remediation.base import Action

ACTIONS: dict[str, str] = {
    "restart": "remediation.restart:Restart",
    "cache_flush": "remediation.cache_flush:CacheFlush",
    "in_doubt": "remediation.in_doubt:InDoubt",
    "failover": "remediation.failover:Failover",
    "rejoin": "remediation.rejoin:Rejoin",
    "switchover": "remediation.switchover:Switchover",
    "restore": "remediation.restore:Restore",
    "backup": "remediation.backup:Backup",
    "drill": "remediation.drill:Drill",
    "prune-backups": "remediation.prune_backups:PruneBackups",
}


class UnknownAction(ValueError):
    pass


def action_class(kind: str) -> type[Action]:
    """The class of an action kind: its `Params` and `OperatorParams`, without building it."""
    try:
        cls: type[Action] = kinds.load(ACTIONS, kind, "action")
    except KeyError as exc:
        raise UnknownAction(exc.args[0]) from None
    return cls


def build_action(kind: str) -> Action:
    return action_class(kind)()
